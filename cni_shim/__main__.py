"""`vpcip-cni`: the CNI executable. Stdlib only, so it starts fast.

env + stdin -> one request to vpcip-ipamd over its Unix socket -> CNI result on
stdout (exit 0) or CNI error on stdout (exit 1). VERSION and `max-pods` answer
without the daemon.
"""

from __future__ import annotations

import json
import os
import sys

from cni_shim import client
from cni_shim.protocol import (
    CURRENT_VERSION,
    ERR_INVALID_ENV,
    ERR_NOT_AVAILABLE,
    ERR_PLUMBING,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    encode_result,
    parse_request,
    parse_version_only,
    version_result,
)
from policy_agent.shared.endpoint import (
    DEFAULT_ENDPOINT_DIR,
    DEFAULT_STATUS_DIR,
    read_record,
    record_key,
    remove_record,
)

USAGE = """usage: vpcip-cni                      (run by a container runtime, CNI_COMMAND in the environment)
       vpcip-cni max-pods --instance-type TYPE
"""


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _fail(exc: CNIError, version: str) -> int:
    _emit(exc.to_dict(version))
    return 1


def max_pods_cmd(args: list[str]) -> int:
    from cni_shim.ipam.limits import limits_for, max_pods

    itype = ""
    if len(args) == 2 and args[0] == "--instance-type":
        itype = args[1]
    elif len(args) == 1 and args[0].startswith("--instance-type="):
        itype = args[0].split("=", 1)[1]
    if not itype:
        sys.stderr.write(USAGE)
        return 2
    try:
        enis, ips = limits_for(itype)
    except KeyError as exc:
        sys.stderr.write(f"vpcip-cni: {exc.args[0]}\n")
        return 1
    print(max_pods(enis, ips))
    return 0


def run(env, stdin: str) -> int:
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        version = parse_version_only(stdin)
        _emit(version_result(version if version in version_result()["supportedVersions"] else CURRENT_VERSION))
        return 0
    version = CURRENT_VERSION
    try:
        req = parse_request(env, stdin, DEFAULT_ENDPOINT_DIR, DEFAULT_STATUS_DIR)
    except CNIError as exc:
        return _fail(exc, version)
    conf = req.conf
    version = conf.cni_version
    if command in ("ADD", "CHECK") and not os.path.exists(req.netns):
        return _fail(CNIError(ERR_INVALID_ENV, f"CNI_NETNS {req.netns} does not exist"), version)
    timeout = conf.request_timeout + conf.policy_wait
    try:
        answer = client.call(conf.ipam_socket, req.to_wire(), timeout)
    except client.DaemonUnavailable as exc:
        if command == "DEL":
            # Nothing to ask the daemon; drop our record so the agent forgets the pod,
            # but only if it is this container's (a newer sandbox of the pod may own it).
            # The daemon frees the address when it starts (veth gone) or on GC.
            if req.k8s_namespace and req.k8s_pod:
                try:
                    path = os.path.join(conf.endpoint_dir, record_key(req.k8s_namespace, req.k8s_pod) + ".json")
                    if read_record(path).container_id == req.container_id:
                        remove_record(conf.endpoint_dir, req.k8s_namespace, req.k8s_pod)
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            sys.stderr.write(f"vpcip-cni: DEL without daemon: {exc}\n")
            return 0
        code = ERR_NOT_AVAILABLE if command == "STATUS" else ERR_TRY_AGAIN_LATER
        return _fail(CNIError(code, str(exc), "start vpcip-ipamd or check ipamSocket in the network config"),
                     version)
    except client.DaemonFailed as exc:
        if command == "DEL":
            return _fail(CNIError(ERR_TRY_AGAIN_LATER, str(exc)), version)
        return _fail(CNIError(ERR_TRY_AGAIN_LATER, str(exc)), version)
    if not answer.get("ok"):
        err = answer.get("error") or {}
        return _fail(CNIError(int(err.get("code", ERR_PLUMBING)), str(err.get("msg", "vpcip-ipamd failed")),
                              str(err.get("details", ""))), version)
    if command == "ADD":
        _emit(encode_result(answer["result"], version))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        if args[0] == "max-pods":
            return max_pods_cmd(args[1:])
        sys.stderr.write(USAGE)
        return 2
    if not os.environ.get("CNI_COMMAND"):
        sys.stderr.write("vpcip-cni: CNI_COMMAND is not set\n" + USAGE)
        _emit(CNIError(ERR_INVALID_ENV, "CNI_COMMAND is not set").to_dict())
        return 1
    stdin = "" if os.environ.get("CNI_COMMAND") == "VERSION" and sys.stdin.isatty() else sys.stdin.read()
    return run(os.environ, stdin)


if __name__ == "__main__":
    sys.exit(main())
