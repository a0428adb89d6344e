"""`vpcip-ipamd`: the node daemon. Owns the pool, does the plumbing, answers vpcip-cni.

Protocol: one JSON object per line on a Unix stream socket; one request and one
answer per connection: {"ok": true, "result": ...} or {"ok": false, "error":
{"code", "msg", "details"}}. Run it in the node's network namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import sys
import threading

import structlog

from cni_shim.commands import Service
from cni_shim.ipam.checkpoint import Checkpoint, CheckpointLocked
from cni_shim.ipam.pool import Pool, Targets
from cni_shim.ipam.provider import PoolFileError, ProviderUnavailable, StaticProvider
from cni_shim.protocol import DEFAULT_SOCKET
from policy_agent import logs

log = structlog.get_logger(__name__)

MAX_REQUEST = 4 << 20
FAULT_ENV = "VPCIP_IPAMD_FAULT"  # test-only: "pause-after-veth=SECONDS"


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        service: Service = self.server.service  # type: ignore[attr-defined]
        line = self.rfile.readline(MAX_REQUEST)
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            self._send({"ok": False, "error": {"code": 6, "msg": "vpcip-ipamd: malformed request"}})
            return
        answer = service.handle(req)
        if not self._send(answer) and req.get("op") == "add" and answer.get("ok"):
            service.abort_add(req)

    def _send(self, answer: dict) -> bool:
        try:
            self.wfile.write(json.dumps(answer).encode() + b"\n")
            self.wfile.flush()
            return True
        except OSError:
            return False


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 128


def _prepare_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody answers
        return
    finally:
        probe.close()
    raise SystemExit(f"vpcip-ipamd: another daemon answers on {path}")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"vpcip-ipamd: environment {name}={raw!r} is not an integer") from None


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1"):
        return True
    if raw in ("false", "0"):
        return False
    raise SystemExit(f"vpcip-ipamd: environment {name}={raw!r} is not a boolean (true/false)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vpcip-ipamd", description="VPC-IP CNI node daemon")
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    p.add_argument("--state-dir", default="/var/run/vpcip")
    p.add_argument("--provider", choices=("static", "ec2"), default=os.environ.get("VPCIP_PROVIDER") or "static",
                   help="where ENIs and addresses come from: the pool file, or the EC2 API (docs/cni.md)")
    p.add_argument("--pool-file", help="the static provider's pool file (required with --provider static)")
    p.add_argument("--log-format", choices=("json", "console"), default="console")
    p.add_argument("--log-level", default="info")
    p.add_argument("--warm-ip-target", type=int, default=_env_int("WARM_IP_TARGET", 0))
    p.add_argument("--minimum-ip-target", type=int, default=_env_int("MINIMUM_IP_TARGET", 0))
    p.add_argument("--warm-eni-target", type=int, default=_env_int("WARM_ENI_TARGET", 1))
    p.add_argument("--cooldown-seconds", type=float, default=float(_env_int("IP_COOLDOWN_PERIOD", 30)))
    p.add_argument("--pool-interval", type=float, default=5.0)
    # EC2 provider (docs/cni.md "EC2 provider" maps each to the AWS CNI's setting)
    p.add_argument("--warm-prefix-target", type=int, default=_env_int("WARM_PREFIX_TARGET", 1))
    p.add_argument("--prefix-delegation", action=argparse.BooleanOptionalAction,
                   default=_env_bool("ENABLE_PREFIX_DELEGATION", False))
    p.add_argument("--dual-stack", action=argparse.BooleanOptionalAction,
                   default=_env_bool("VPCIP_DUAL_STACK", False))
    p.add_argument("--cluster-name", default=os.environ.get("CLUSTER_NAME", ""))
    p.add_argument("--leaked-eni-grace-seconds", type=float,
                   default=float(_env_int("VPCIP_LEAKED_ENI_GRACE_SECONDS", 600)))
    p.add_argument("--eni-gc-interval", type=float, default=float(_env_int("VPCIP_ENI_GC_INTERVAL_SECONDS", 300)))
    p.add_argument("--add-wait-seconds", type=float, default=float(_env_int("VPCIP_ADD_WAIT_SECONDS", 10)),
                   help="longest an ADD on an empty pool waits for the background fill before code 11 "
                        "(also kept under the request's own timeout)")
    p.add_argument("--eni-plumbing", action=argparse.BooleanOptionalAction,
                   default=_env_bool("VPCIP_ENI_PLUMBING", True),
                   help="set up secondary ENIs' links, route tables and source rules (EC2 provider)")
    p.add_argument("--eni-mtu", type=int, default=_env_int("AWS_VPC_ENI_MTU", 9001))
    args = p.parse_args(argv)
    if args.provider == "static" and not args.pool_file:
        p.error("--pool-file is required with --provider static")
    if args.warm_prefix_target < 0 or args.leaked_eni_grace_seconds < 0 or args.eni_gc_interval <= 0:
        p.error("--warm-prefix-target and --leaked-eni-grace-seconds must be >= 0, --eni-gc-interval > 0")
    for name in ("warm_ip_target", "minimum_ip_target", "warm_eni_target"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.add_wait_seconds < 0 or not 576 <= args.eni_mtu <= 9001:
        p.error("--add-wait-seconds must be >= 0 and --eni-mtu within 576..9001")
    if args.cooldown_seconds < 0 or args.pool_interval <= 0:
        p.error("--cooldown-seconds must be >= 0 and --pool-interval > 0")
    return args


def _fault_pause() -> float:
    raw = os.environ.get(FAULT_ENV, "")
    if raw.startswith("pause-after-veth="):
        return float(raw.split("=", 1)[1])
    return 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    if args.provider == "ec2":
        from cni_shim.ipam.ec2 import Ec2Provider, Ec2Settings  # boto3: the daemon's EC2 path only
        from cni_shim.ipam.imds import ImdsError

        settings = Ec2Settings(args.cluster_name, args.prefix_delegation, args.dual_stack,
                               args.leaked_eni_grace_seconds)
        try:
            provider = Ec2Provider.from_environment(settings)
        except (ImdsError, ProviderUnavailable, ValueError) as exc:
            log.error("ec2_provider_failed", error=str(exc))
            print(f"vpcip-ipamd: EC2 provider: {exc}", file=sys.stderr)
            return 2
    else:
        try:
            provider = StaticProvider.from_file(args.pool_file)
        except PoolFileError as exc:
            log.error("pool_file_invalid", error=str(exc))
            print(f"vpcip-ipamd: {exc}", file=sys.stderr)
            return 2
    targets = Targets(args.warm_ip_target, args.minimum_ip_target, args.warm_eni_target, args.cooldown_seconds,
                      args.warm_prefix_target)
    checkpoint = Checkpoint(args.state_dir)
    try:
        checkpoint.acquire()
    except CheckpointLocked as exc:
        print(f"vpcip-ipamd: {exc}", file=sys.stderr)
        return 2
    service = Service(Pool(provider, targets), checkpoint, fault_pause_after_veth=_fault_pause(),
                      add_wait=args.add_wait_seconds, eni_plumbing=args.eni_plumbing, eni_mtu=args.eni_mtu)
    service.background_upkeep = True  # upkeep_loop below is the fill: an ADD's shortfall wakes it
    try:
        service.restore()
    except ValueError as exc:
        print(f"vpcip-ipamd: checkpoint {checkpoint.path}: {exc}", file=sys.stderr)
        return 2
    _prepare_socket(args.socket)
    old_umask = os.umask(0o177)  # socket mode 0600: only root may ask for addresses
    try:
        server = Server(args.socket, _Handler)
    finally:
        os.umask(old_umask)
    server.service = service  # type: ignore[attr-defined]
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    gc_leaked = getattr(provider, "gc_leaked", None)

    def eni_gc_loop() -> None:
        # Outside the pool lock: it only deletes unattached ENIs, which the pool never holds.
        while gc_leaked is not None and not stop.is_set():
            try:
                gc_leaked()
            except ProviderUnavailable as exc:
                log.warning("leaked_eni_gc_failed", error=str(exc))
            except Exception:  # noqa: BLE001 - keep the GC loop alive
                log.exception("leaked_eni_gc_crashed")
            stop.wait(args.eni_gc_interval)

    def upkeep_loop() -> None:
        while not stop.is_set():
            service.pool_changed.wait(args.pool_interval)
            service.pool_changed.clear()
            if stop.is_set():
                break
            try:
                service.upkeep()
            except Exception:  # noqa: BLE001 - keep the pool loop alive
                log.exception("pool_upkeep_failed")

    threading.Thread(target=upkeep_loop, name="pool-upkeep", daemon=True).start()
    threading.Thread(target=eni_gc_loop, name="eni-gc", daemon=True).start()
    limits = provider.limits
    log.info("ipamd_started", socket=args.socket, state_dir=args.state_dir, provider=args.provider,
             pool_file=args.pool_file, prefix_delegation=limits.prefix_delegation,
             instance_type=limits.instance_type, max_pods=limits.max_pods, pid=os.getpid(),
             warm_ip_target=targets.warm_ip, minimum_ip_target=targets.minimum_ip,
             warm_eni_target=targets.warm_eni, cooldown=targets.cooldown)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        try:
            os.unlink(args.socket)
        except FileNotFoundError:
            pass
        checkpoint.release()
        log.info("ipamd_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
