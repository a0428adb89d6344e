"""NetworkPolicy v1 -> DesiredState (iptables chains + ipsets) for one node.

Rules and theory (details and reasons in docs/decisions/compiler.md):

* Pure and deterministic: the same objects give byte-identical output; no I/O.
* A *local endpoint* is a pod with spec.nodeName == this node that is neither
  host-network nor finished. Each gets, per address family it has an address
  in, a to-workload chain (ingress) and a from-workload chain (egress).
* Built-in hooks jump to pa-FORWARD / pa-INPUT / pa-OUTPUT. pa-FORWARD first
  drops packets from a pod veth whose (source address, interface) is not in the
  per-family local-endpoints set (hash:net,iface: anti-spoofing), then accepts
  RELATED,ESTABLISHED and drops INVALID packets to or from pod veths, so only a
  flow's first packet goes on. It sends packets from pod veths through the
  one-level from-wl dispatch tree (goto the pod's fw chain) and packets to pod
  veths through the to-wl tree (tw chain). An allow verdict sets the accept
  mark and RETURNs; pa-FORWARD accepts only when the mark survives both, so a
  flow between two local pods needs the source's egress *and* the
  destination's ingress. Unknown interfaces with our prefix have no entry in
  the set (everything they send is dropped) and hit the "unknown interface"
  deny at the end of every dispatch chain. Pod -> node (pa-INPUT ->
  pa-wl-to-host) gets the same anti-spoofing and conntrack rules.
* Endpoint chains: "clear accept mark", then either "not isolated: allow" or a
  jump per selecting policy followed by "return if accepted", ending in a deny.
* Policy chains (pa-pi-/pa-po-) are shared by every local endpoint the policy
  selects; each (rule, peer, port) is one rule that sets the accept mark. Peers
  are selector ipsets shared by identity, ipBlocks are -s/-d or a hash:net set
  with "nomatch" excepts; named ports are hash:ip,port sets.
* Only policies selecting a local endpoint, and only the ipsets their rendered
  chains reference, appear in the output.
"""

from policy_agent.compiler.core import Compiler, compile  # noqa: A004 - the public name

__all__ = ["Compiler", "compile"]
