#!/bin/sh
# A rootless dev environment (docs/recipes.md): nginx with its production configuration (listen 80,
# proxy_pass http://127.0.0.1:$APP_PORT) under lowport, in front of an app that runs on the host's
# loopback, 127.0.0.1:$APP_PORT. No sudo, no setcap, no edit to the configuration.
#
#   scripts/recipes/dev-env.sh          runs nginx in the foreground on host port $PORT (Ctrl-C stops it)
#   scripts/recipes/dev-env.sh reload   makes the running nginx read its edited configuration
set -eu
APP_PORT=${APP_PORT:-3000}  # where the app listens, on the host's 127.0.0.1
PORT=${PORT:-8080}          # the host port nginx is published on
SITE=${SITE:-$PWD/site}     # nginx's directory: nginx.conf, and its pid and temporary files in tmp/
NAME=${NAME:-web}           # the instance's name, for lowport exec and lowport stop

if [ "${1-}" = reload ]; then
    exec lowport exec "$NAME" -- nginx -e stderr -p "$SITE" -c nginx.conf -s reload
fi

# A first configuration when there is none: nginx as in production, in front of the app.
mkdir -p "$SITE/tmp"
[ -e "$SITE/nginx.conf" ] || cat > "$SITE/nginx.conf" <<CONF
user root;
daemon off;
pid tmp/nginx.pid;
error_log stderr notice;
events {}
http {
    access_log /dev/stdout;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen 80;
        location / {
            proxy_pass http://127.0.0.1:$APP_PORT;
        }
    }
}
CONF

exec lowport run --name "$NAME" --host-loopback "$APP_PORT" -p "$PORT:80" -- nginx -e stderr -p "$SITE" -c nginx.conf
