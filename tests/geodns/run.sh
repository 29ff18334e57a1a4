#!/usr/bin/env bash
# Geo-DNS in front of three Tern regions, on one machine, in network namespaces: the
# README's "Production" walkthrough minus the reading.
#
#   tests/geodns/run.sh [--keep]   (as root; TERN_BIN=path/to/tern, default target/debug/tern)
#   tests/geodns/run.sh --hold     steps 1-3 with namespaces named tern-*, then print what
#                                  to try (README "Production"); Ctrl-C removes it all
#
# 1. `tern certs`: the cluster CA, node certificates, gossip key, and a client-port
#    certificate for realtime.tern.test and the regions' own names.
# 2. Eight namespaces on one bridge (10.77.0.0/16): a node per region (us-east
#    10.77.11.1, eu-west 10.77.12.1, ap-south 10.77.13.1), each running `tern serve
#    --config regions/REGION.toml` over TLS on port 443 with only addresses, folders and
#    certificates overridden; clients per continent (us 10.77.1.0/24, eu 10.77.2.0/24,
#    ap 10.77.3.0/24); BIND 9 (deploy/geodns/bind/named.conf) at 10.77.53.1 answering
#    realtime.tern.test with the nearest region by the client's source network.
#    Each namespace's /etc/netns/NS/resolv.conf names that server, so plain
#    getaddrinfo (Node's dns.lookup) asks it.
# 3. A health checker (as Route 53 or NS1 would) polls each region's /health and, when
#    one fails twice, rewrites the views that answered it to the next nearest region.
# 4. tests/js/geodns/check.mjs: ably-js clients in each continent land in their region;
#    an eu subscriber on eu-west, publishers in ap and eu, eu-west SIGKILLed mid-stream,
#    the subscriber fails over (ably-js fallbackHosts: the regions' names) and gets every
#    ACKed message exactly once; then a new eu client resolves the name to the next
#    nearest region.
#
# Everything is removed on exit (namespaces, /etc/netns entries, the processes this
# script started, by PID); --keep leaves the scratch folder (logs) in place.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
KEEP=0
HOLD=0
for arg in "$@"; do
  case $arg in
    --keep) KEEP=1 ;;
    --hold) HOLD=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "tests/geodns/run.sh needs root (ip netns)" >&2; exit 1; }
TERN=${TERN_BIN:-$ROOT/target/debug/tern}
[[ -x $TERN ]] || cargo build -q -p tern-server
tests/apt-install.sh named bind9
tests/apt-install.sh dig dnsutils
tests/apt-install.sh ip iproute2
tests/apt-install.sh curl curl
if [[ ! -d tests/js/node_modules/ably ]]; then (cd tests/js && npm ci --no-audit --no-fund --loglevel=error); fi

ID=tgd$$                      # namespace names: unique per run
if [[ $HOLD == 1 ]]; then
  ID=tern                     # short names to type
  ip netns list | grep -q "^$ID-" && { echo "namespaces $ID-* exist already (another --hold?)" >&2; exit 1; }
fi
RUN=$(mktemp -d /tmp/tern-geodns.XXXXXX)
REGIONS=(us-east eu-west ap-south)
CONTINENTS=(us eu ap)
declare -A NODE_ADDR=([us-east]=10.77.11.1 [eu-west]=10.77.12.1 [ap-south]=10.77.13.1)
declare -A CLIENT_ADDR=([us]=10.77.1.10 [eu]=10.77.2.10 [ap]=10.77.3.10)
DNS_ADDR=10.77.53.1
NAMESPACES=()
PIDS=()

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  for ns in "${NAMESPACES[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  if [[ $rc != 0 && $HOLD == 0 ]]; then
    for log in "$RUN"/*.log; do [[ -f $log ]] && { echo "--- $log"; tail -n 20 "$log"; }; done
  fi
  if [[ $KEEP == 1 ]]; then echo "logs kept in $RUN"; else rm -rf "$RUN"; fi
  exit $rc
}
trap cleanup EXIT INT TERM

# --- the network: a bridge in the "wan" namespace, one veth per host namespace.
WAN=$ID-wan
ip netns add "$WAN"; NAMESPACES+=("$WAN")
ip -n "$WAN" link set lo up
ip -n "$WAN" link add br0 type bridge
ip -n "$WAN" link set br0 up
host_ns() { # host_ns NAME ADDRESS: a namespace on the bridge with ADDRESS/16, resolving with BIND
  local ns=$ID-$1
  ip netns add "$ns"; NAMESPACES+=("$ns")
  ip -n "$WAN" link add "v-$1" type veth peer name eth0 netns "$ns"
  ip -n "$WAN" link set "v-$1" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$2/16" dev eth0
  ip -n "$ns" link set eth0 up
  mkdir -p "/etc/netns/$ns"
  printf 'nameserver %s\noptions timeout:1 attempts:2\n' "$DNS_ADDR" > "/etc/netns/$ns/resolv.conf"
  printf '127.0.0.1 localhost\n' > "/etc/netns/$ns/hosts"
}
host_ns dns "$DNS_ADDR"
for r in "${REGIONS[@]}"; do host_ns "$r" "${NODE_ADDR[$r]}"; done
for c in "${CONTINENTS[@]}"; do host_ns "$c" "${CLIENT_ADDR[$c]}"; done
in_ns() { local ns=$ID-$1; shift; ip netns exec "$ns" "$@"; }

# --- BIND: the committed config, its directory pointed at a scratch copy.
cp -r deploy/geodns/bind "$RUN/bind"
sed -i "s|directory \"/etc/bind/tern\"|directory \"$RUN/bind\"|" "$RUN/bind/named.conf"
named-checkconf "$RUN/bind/named.conf"
# (`ip netns exec` execs, and a simple command in the background is its own process:
# $! is named's PID, not a subshell's.)
ip netns exec "$ID-dns" named -g -c "$RUN/bind/named.conf" > "$RUN/named.log" 2>&1 &
NAMED_PID=$!
PIDS+=("$NAMED_PID")
for _ in $(seq 100); do
  in_ns eu dig +short +time=1 +tries=1 realtime.tern.test >/dev/null 2>&1 && break
  sleep 0.1
done
for c in "${CONTINENTS[@]}"; do
  echo "dig from $c: realtime.tern.test -> $(in_ns "$c" dig +short realtime.tern.test)"
done
[[ $(in_ns eu dig +short realtime.tern.test) == "${NODE_ADDR[eu-west]}" ]] \
  || { echo "BIND did not answer eu with eu-west" >&2; exit 1; }

# --- certificates and the three regions, each `tern serve` with its production config.
nodes=$(IFS=,; echo "${REGIONS[*]/%/-1}")
"$TERN" certs --out "$RUN/certs" --nodes "$nodes" \
  --edge-names realtime.tern.test,us-east.tern.test,eu-west.tern.test,ap-south.tern.test >/dev/null
declare -A TERN_PID
for r in "${REGIONS[@]}"; do
  addr=${NODE_ADDR[$r]}
  seeds=()
  for other in "${REGIONS[@]}"; do [[ $other != "$r" ]] && seeds+=("\"${NODE_ADDR[$other]}:7946\""); done
  ip netns exec "$ID-$r" "$TERN" serve --config "$ROOT/regions/$r.toml" \
    --set server.host="$addr" --set server.port=443 \
    --set "server.tls={ cert = \"$RUN/certs/edge.pem\", key = \"$RUN/certs/edge.key\" }" \
    --set history.path="$RUN/$r/history.redb" \
    --set cluster.quic_listen="$addr:7443" --set cluster.gossip_listen="$addr:7946" \
    --set "cluster.seeds=[$(IFS=,; echo "${seeds[*]}")]" \
    --set cluster.ca_cert="$RUN/certs/ca.pem" \
    --set cluster.cert="$RUN/certs/$r-1.pem" --set cluster.key="$RUN/certs/$r-1.key" \
    --set cluster.gossip_key="$RUN/certs/gossip.key" \
    --set cluster.emulate_topology="$ROOT/regions/topology.toml" \
    > "$RUN/$r.log" 2>&1 &
  TERN_PID[$r]=$!
  PIDS+=("$!")
  disown "$!"   # no "Killed" line from bash when check.mjs kills it
done
for r in "${REGIONS[@]}"; do
  for _ in $(seq 150); do grep -q "listening on" "$RUN/$r.log" && break; sleep 0.1; done
  grep -q "listening on" "$RUN/$r.log" || { echo "$r did not start" >&2; exit 1; }
  echo "$r: $(grep -m1 "region " "$RUN/$r.log" | sed 's/^ *//')"
done

# --- the health checker: what a hosted geo-DNS does with health checks on /health.
# Each view's answer falls back to the next nearest live region (regions/topology.toml's
# delays: eu-west to us-east 40 ms, to ap-south 70 ms; us-east to ap-south 110 ms).
declare -A NEAREST=([us]="us-east eu-west ap-south" [eu]="eu-west us-east ap-south" [ap]="ap-south eu-west us-east")
health_checker() {
  declare -A fails=() answer=([us]=us-east [eu]=eu-west [ap]=ap-south)
  local serial=1
  while true; do
    for r in "${REGIONS[@]}"; do
      if in_ns dns curl -sf -o /dev/null --max-time 1 --cacert "$RUN/certs/edge-ca.pem" \
          --resolve "$r.tern.test:443:${NODE_ADDR[$r]}" "https://$r.tern.test/health"; then
        fails[$r]=0
      else
        fails[$r]=$(( ${fails[$r]:-0} + 1 ))
      fi
    done
    local changed=0
    for c in "${CONTINENTS[@]}"; do
      for r in ${NEAREST[$c]}; do
        (( ${fails[$r]:-0} >= 2 )) && continue
        if [[ ${answer[$c]} != "$r" ]]; then
          answer[$c]=$r
          changed=1
          sed -i -E "s/^(realtime +IN A +)[0-9.]+.*/\1${NODE_ADDR[$r]}      ; health checks: $r/" "$RUN/bind/$c.zone"
          echo "health: view $c now answers $r"
        fi
        break
      done
    done
    if (( changed )); then
      serial=$((serial + 1))
      sed -i -E "s/\( [0-9]+ 60 30 600 5 \)/( $serial 60 30 600 5 )/" "$RUN"/bind/*.zone
      kill -HUP "$NAMED_PID"   # named re-reads its config and changed zone files
    fi
    sleep 0.5
  done
}
health_checker > "$RUN/health.log" 2>&1 &
PIDS+=("$!")

# --- the clients: ably-js in the continents' namespaces.
key=$(sed -n 's/^secret = "\(.*\)"/\1/p' regions/us-east.toml | head -1)
if [[ $HOLD == 1 ]]; then
  cat <<INFO

Up: namespaces $ID-{us,eu,ap} (clients), $ID-{us-east,eu-west,ap-south} (nodes), $ID-dns (BIND).
Try, in another terminal (as root, in $ROOT):
  ip netns exec $ID-eu dig +short realtime.tern.test
  ip netns exec $ID-eu env NODE_EXTRA_CA_CERTS=$RUN/certs/edge-ca.pem GEODNS_KEY=prod.server:$key \\
    node tests/js/geodns/client.mjs land
  ip netns exec $ID-eu curl --cacert $RUN/certs/edge-ca.pem https://realtime.tern.test/health
  kill -9 ${TERN_PID[eu-west]}      # eu-west's tern; then the commands above again
Logs: $RUN (the health checker's: health.log). Ctrl-C here stops and removes everything.
INFO
  sleep infinity &
  PIDS+=("$!")
  wait "$!"
fi
GEODNS_NS_PREFIX=$ID GEODNS_KEY="prod.server:$key" GEODNS_CA="$RUN/certs/edge-ca.pem" \
  GEODNS_KILL_PID="${TERN_PID[eu-west]}" \
  node tests/js/geodns/check.mjs
cat "$RUN/health.log"
