"""NetworkPolicy v1 -> DesiredState (iptables chains + ipsets) for one node.

Rules and theory (details and reasons in docs/decisions/compiler.md):

* Pure and deterministic: the same objects give byte-identical output; no I/O.
* A *local endpoint* is a pod with spec.nodeName == this node that is neither
  host-network nor finished. Each gets, per address family it has an address
  in, a to-workload chain (ingress) and a from-workload chain (egress).
* Built-in hooks jump to pa-FORWARD / pa-INPUT / pa-OUTPUT. pa-FORWARD sends
  packets from pod veths through the one-level from-wl dispatch tree (goto the
  pod's fw chain) and packets to pod veths through the to-wl tree (tw chain).
  An allow verdict sets the accept mark and RETURNs; pa-FORWARD accepts only
  when the mark survives both, so a flow between two local pods needs the
  source's egress *and* the destination's ingress. Unknown interfaces with our
  prefix hit the "unknown interface" deny at the end of every dispatch chain.
* Endpoint chains: (fw only) anti-spoofing first, then conntrack
  ESTABLISHED,RELATED accept and INVALID drop, then either "not isolated:
  allow" or a jump per selecting policy followed by "return if accepted",
  ending in a deny.
* Policy chains (pa-pi-/pa-po-) are shared by every local endpoint the policy
  selects; each (rule, peer, port) is one rule that sets the accept mark. Peers
  are selector ipsets shared by identity, ipBlocks are -s/-d or a hash:net set
  with "nomatch" excepts; named ports are hash:ip,port sets.
* Only policies selecting a local endpoint, and only the ipsets their rendered
  chains reference, appear in the output.
"""

from policy_agent.compiler.core import Compiler, compile  # noqa: A004 - the public name

__all__ = ["Compiler", "compile"]
