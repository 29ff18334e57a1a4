#!/bin/sh
# certbot deploy hook: install a renewed certificate where the tern service reads it
# (/etc/tern/tls, readable by the tern user; certbot's own files are root's only), then
# reload it without dropping connections (SIGHUP through systemctl reload).
#
#   install -m 755 deploy/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/tern
#
# certbot sets RENEWED_LINEAGE (e.g. /etc/letsencrypt/live/rt-eu-west.example.com).
set -eu
dir=/etc/tern/tls
install -d -m 750 -o root -g tern "$dir"
install -m 644 -o root -g tern "$RENEWED_LINEAGE/fullchain.pem" "$dir/fullchain.pem.new"
install -m 640 -o root -g tern "$RENEWED_LINEAGE/privkey.pem" "$dir/privkey.pem.new"
mv "$dir/fullchain.pem.new" "$dir/fullchain.pem"
mv "$dir/privkey.pem.new" "$dir/privkey.pem"
# Reload only a running tern (the first certificate is installed before it starts).
if systemctl is-active --quiet tern; then systemctl reload tern; fi
