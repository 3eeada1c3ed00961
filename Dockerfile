# mssgw gateway image: the `mssgw` command, run as an unprivileged user on the /data home folder.
# Build: docker build -t mssgw .   Run: see docker-compose.yml (mssgw init, then mssgw serve).
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends gnupg openssl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY directory ./directory
COPY cli ./cli
COPY certs ./certs
RUN pip install --no-cache-dir . && rm -rf /src
# The one-shot setup steps of docker-compose.yml (init + peers export, then peers add).
COPY deploy/compose-setup.sh /usr/local/bin/mssgw-compose-setup

# /bundles: where compose's operators leave their peer bundles for each other (nothing secret);
# it exists in the image so that a new named volume mounted there belongs to mssgw.
RUN useradd --system --create-home --home-dir /home/mssgw mssgw \
 && chmod 0755 /usr/local/bin/mssgw-compose-setup \
 && mkdir /data /bundles /data/mail && chown mssgw:mssgw /data /bundles /data/mail && chmod 0700 /data /data/mail
USER mssgw
WORKDIR /data
VOLUME ["/data"]
ENV MSSGW_HOME=/data

# submission (STARTTLS), submissions (implicit TLS), inbound from peer operators, IMAP, IMAPS
# (docker-compose.yml publishes only submission and IMAPS, on 127.0.0.1)
EXPOSE 1587 1465 1025 1143 1993
CMD ["mssgw", "serve", "--data-dir", "/data"]
