#!/bin/sh
# One operator's one-shot setup in docker-compose.yml, in two steps ordered by `depends_on`:
#
#   compose-setup.sh init DOMAIN HOSTNAME INBOUND   create or update the home ($MSSGW_HOME),
#       with a server certificate naming HOSTNAME (the name peers relay to), then publish our
#       peer bundle (CA, operator certificate and DN, domains, INBOUND) in the shared folder.
#   compose-setup.sh peer PEER_DOMAIN               trust the peer whose bundle is there
#       (its CA, route and operator DN, in one idempotent `peers add`).
#   compose-setup.sh clone SOURCE_HOME              provision another node of the same operator:
#       its configuration, the public PKI files and the TLS listener's certificate and key copied
#       from SOURCE_HOME (node 1's home, mounted read-only for this step only); never a private key
#       of the directory (they are sealed in the database; the node is given the key-encryption
#       key as MSSGW_KEK), the CA's key, the OpenPGP keyring, the spool, seals or mail.
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
        # tar keeps modes (server.key 0600, folders 0700). The development PKI's own copies of the
        # CA and operator keys stay behind: the gateway reads the operator key from the database.
        (cd "$2" && tar -cf - --exclude='pki/ca.key' --exclude='pki/operator.key' --exclude='*.tmp' mssgw.toml pki) \
            | (cd "$home" && tar -xpf -)
        echo "node home $home provisioned from $2"
        ;;
    *)
        usage
        ;;
esac
