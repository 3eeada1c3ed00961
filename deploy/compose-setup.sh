#!/bin/sh
# One operator's one-shot setup in docker-compose.yml, in two steps ordered by `depends_on`:
#
#   compose-setup.sh init DOMAIN HOSTNAME INBOUND   create or update the home ($MSSGW_HOME),
#       with a server certificate naming HOSTNAME (the name peers relay to), then publish our
#       peer bundle (CA, operator certificate and DN, domains, INBOUND) in the shared folder.
#   compose-setup.sh peer PEER_DOMAIN               trust the peer whose bundle is there
#       (its CA, route and operator DN, in one idempotent `peers add`).
#   compose-setup.sh clone SOURCE_HOME              provision another node of the same operator:
#       its configuration, PKI, private keys and OpenPGP keyring copied from SOURCE_HOME (node 1's
#       home, mounted read-only for this step only); never its spool, seals or mail.
#
# Each operator only ever touches its own home; the bundles folder ($PEER_BUNDLES, a volume
# shared by both operators, default /bundles) is the only thing they have in common, and holds
# nothing secret. Every step is idempotent, so `docker compose up` may run it again.
# tests/test_compose.py runs this very script on two temporary homes.
set -eu

home="${MSSGW_HOME:-/data}"
bundles="${PEER_BUNDLES:-/bundles}"

usage() {
    echo "usage: $0 init DOMAIN HOSTNAME INBOUND | $0 peer PEER_DOMAIN | $0 clone SOURCE_HOME" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in
    init)
        [ $# -eq 4 ] || usage
        mssgw init --data-dir "$home" --domain "$2" --hostname "$3"
        # Written aside then renamed: a peer never reads half a bundle.
        mssgw peers export --data-dir "$home" --inbound "$4" -o "$bundles/.$2.peer.json.tmp"
        mv -f "$bundles/.$2.peer.json.tmp" "$bundles/$2.peer.json"
        ;;
    peer)
        [ $# -eq 2 ] || usage
        mssgw peers add --data-dir "$home" --from "$bundles/$2.peer.json"
        mssgw peers show --data-dir "$home" "$2"
        ;;
    clone)
        [ $# -eq 2 ] || usage
        [ -f "$2/mssgw.toml" ] || { echo "$0: $2 is not an initialised home" >&2; exit 1; }
        mkdir -p "$home"
        # tar keeps modes (keys 0600, folders 0700); gpg-agent sockets and lock files stay behind.
        (cd "$2" && tar -cf - --exclude='S.*' --exclude='*.lock' mssgw.toml pki keys gnupg) | (cd "$home" && tar -xpf -)
        echo "node home $home provisioned from $2"
        ;;
    *)
        usage
        ;;
esac
