"""The incremental compiler: a label index over pods, namespaces and policies.

State kept (all keyed, nothing recomputed wholesale on an event):
- pods by namespace, policies by namespace, local endpoints by namespace;
- for each policy, the local endpoints it selects (a policy is *active* iff that
  set is not empty) and, for each local endpoint, the policies selecting it;
- one ``_Scope`` per selector/named-port scope referenced by an active policy,
  ref-counted, holding its members per family; ``_ns_index`` maps a namespace
  to the scopes that cover it, so a pod event touches only those scopes and a
  namespace label change only re-tests the namespace-selector scopes.
``desired()`` keeps, per family, the output as a sum of per-owner contributions
(each endpoint, each (policy, direction), the dispatch tree) and swaps only the
owners an event touched: a policy chain is rebuilt only when its policy changed,
an endpoint chain only when the endpoint's view (addresses, policy lists)
changed, an ipset only when its members changed. A remote pod or a namespace
event therefore changes ipset members and nothing else.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Mapping

import structlog

from policy_agent.compiler import chains as ch
from policy_agent.compiler.options import NodeConfig
from policy_agent.compiler.scopes import ScopeDef, eligible, selector_matches
from policy_agent.desired import FILTER, Chain, DesiredState, Hook, IPSet, LocalEndpoint
from policy_agent.model.types import (
    NAMESPACE_NAME_LABEL,
    ClusterNetworkPolicy,
    ClusterSnapshot,
    CNPTier,
    Node,
    Labels,
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyType,
)
from policy_agent.shared import naming

log = structlog.get_logger(__name__)

PodKey = tuple[str, str]
PolicyKey = tuple[str, str]


class _TrackedDict(dict):
    """A dict the garbage collector never untracks.

    A full collection untracks an exact dict whose keys and values hold no container
    (pod key -> tuple of address strings); inserting one fresh tuple later tracks it
    again, as a *young* object, and every young collection then walks all its entries
    (~10 ms for 50,000 pods, cache misses on every key). The agent freezes its heap
    once ready: a dict that is tracked at that moment stays out of the collector's way.
    """

    __slots__ = ()


@dataclass
class _Scope:
    defn: ScopeDef
    refs: int = 0
    matched_ns: set[str] = field(default_factory=set)
    pod_members: dict[PodKey, tuple[tuple[int, str], ...]] = field(default_factory=_TrackedDict)
    counts: dict[int, Counter] = field(default_factory=lambda: {4: Counter(), 6: Counter()})
    cache: dict[int, IPSet] = field(default_factory=dict)
    # members added / removed since cache[family] was built (disjoint): the next set is
    # (cached - removed) | added, a copy of the old frozenset instead of a rebuild
    added: dict[int, set[str]] = field(default_factory=lambda: {4: set(), 6: set()})
    removed: dict[int, set[str]] = field(default_factory=lambda: {4: set(), 6: set()})


class Compiler:
    """Feed it object events; ask it for ``desired()`` whenever you want to apply."""

    def __init__(self, node: NodeConfig) -> None:
        self.node = node
        self.families = (4, 6) if node.ipv6 else (4,)
        self.namespaces: dict[str, Namespace] = {}
        self.pods: dict[PodKey, Pod] = {}
        self.policies: dict[PolicyKey, NetworkPolicy] = {}
        # namespace -> {pod: its plain labels}: scans of a namespace read labels without a lookup
        self._pods_by_ns: dict[str, dict[PodKey, dict[str, str]]] = {}
        self._pols_by_ns: dict[str, set[PolicyKey]] = {}
        self._local_by_ns: dict[str, set[PodKey]] = {}
        self._local: set[PodKey] = set()
        self._pol_selected: dict[PolicyKey, set[PodKey]] = {}
        self._ep_policies: dict[PodKey, set[PolicyKey]] = {}
        self._pol_scopes: dict[PolicyKey, set[ScopeDef]] = {}
        self._scopes: dict[ScopeDef, _Scope] = {}
        self._ns_index: dict[str, set[ScopeDef]] = {}
        self._nssel_scopes: set[ScopeDef] = set()
        # pod -> its /32 and /128 members
        self._plain_members: dict[PodKey, tuple[tuple[int, str], ...]] = _TrackedDict()
        self._plain_of: dict[PodKey, Pod] = {}
        self._changed_scopes: set[ScopeDef] = set()  # members changed since the last desired()
        self._pod_labels: dict[PodKey, dict[str, str]] = {}  # plain dicts for fast matching
        self._ns_plain: dict[str, dict[str, str]] = {}
        self._ns_by_label: dict[tuple[str, str], set[str]] = {}  # (key, value) -> namespaces with it
        self._ns_unknown: set[str] = set()  # namespaces we hold pods of but no object for
        # namespace -> (label, value) -> its pods with that label, for the pairs a scope's
        # pod selector was ever looked up by there (filled by the first scan, then kept
        # up to date by pod events): a scope created again later reads its members from
        # here instead of scanning every pod of every namespace it covers
        self._postings: dict[str, dict[tuple[str, str], set[PodKey]]] = {}
        # output caches
        self._static = {f: ch.static_chains(node, f) for f in (4, 6)}
        self._ep_dirty: set[PodKey] = set()
        self._ep_out: dict[PodKey, LocalEndpoint] = {}
        self._ep_keys: list[PodKey] = []  # the keys of _ep_out, sorted
        self._ep_fam: dict[int, dict[PodKey, tuple[ch.EndpointView, ch.Built]]] = {f: {} for f in self.families}
        self._endpoints: tuple[LocalEndpoint, ...] = ()
        self._pol_cache: dict[tuple[str, int, str], ch.Built] = {}  # (ref, family, direction)
        self._tables = {f: _FamilyTable(self._static[f], f) for f in self.families}
        # ClusterNetworkPolicy tiers (docs/decisions/cluster-network-policy.md): cluster-wide,
        # few, so selection is a scan of the CNPs per local endpoint event, and of the
        # local endpoints per CNP event.
        self.cluster_policies: dict[str, ClusterNetworkPolicy] = {}
        self.nodes: dict[str, Node] = {}
        self._cnp_selected: dict[str, set[PodKey]] = {}
        self._ep_cnps: dict[PodKey, set[str]] = {}
        self._cnp_scopes: dict[str, set[ScopeDef]] = {}
        self._cnp_cache: dict[tuple[str, int, str], ch.Built] = {}  # (name, family, direction)
        self._cnp_helpers = ch.Built(chains=ch.cnp_helper_chains(node))

    # --- loading ----------------------------------------------------------------

    def load(self, snapshot: ClusterSnapshot) -> "Compiler":
        """Bulk load: namespaces, then pods, then policies (scopes are filled once)."""
        for name in sorted(snapshot.namespaces):
            self.upsert_namespace(snapshot.namespaces[name])
        if not (self.pods or self.policies or self.cluster_policies or self._scopes):
            self._load_pods(snapshot.pods.values())
        else:
            for key in sorted(snapshot.pods):
                self.upsert_pod(snapshot.pods[key])
        for key in sorted(snapshot.policies):
            self.upsert_policy(snapshot.policies[key])
        for name in sorted(snapshot.nodes):
            self.upsert_node(snapshot.nodes[name])
        for name in sorted(snapshot.cluster_policies):
            self.upsert_cluster_policy(snapshot.cluster_policies[name])
        return self

    def _load_pods(self, pods) -> None:
        """``upsert_pod`` for each pod, into a compiler with no pods, policies or scopes
        yet: no scope to file a pod into and no policy to select it, so what is left is
        the indexes (and the local endpoints, through the usual path). The order does
        not matter: every output is sorted."""
        by_ns, pod_labels, local, node_name = self._pods_by_ns, self._pod_labels, [], self.node.node_name
        for pod in pods:
            key = (pod.namespace, pod.name)  # pod.key, without the property call (50,000 times)
            self.pods[key] = pod
            labels = pod_labels[key] = pod.labels.plain()  # shared with the pod, never modified
            ns_pods = by_ns.get(pod.namespace)
            if ns_pods is None:
                ns_pods = by_ns[pod.namespace] = {}
                if pod.namespace not in self._ns_plain:
                    self._ns_unknown.add(pod.namespace)
            ns_pods[key] = labels
            if pod.node_name == node_name and self._is_local(pod):
                local.append(key)
        for key in local:
            self._update_local(key)

    # --- namespaces ---------------------------------------------------------------

    def _ns_labels(self, name: str) -> dict[str, str]:
        d = self._ns_plain.get(name)
        if d is None:
            d = {NAMESPACE_NAME_LABEL: name}  # a namespace we have not seen (yet)
        return d

    def upsert_namespace(self, ns: Namespace) -> None:
        if NAMESPACE_NAME_LABEL not in ns.labels:
            # The API server always sets it (since 1.21); objects built by hand may not.
            ns = Namespace(ns.name, Labels({**ns.labels, NAMESPACE_NAME_LABEL: ns.name}), ns.resource_version)
        old = self.namespaces.get(ns.name)
        self.namespaces[ns.name] = ns
        self._index_ns(ns.name, dict(ns.labels.items_tuple()))
        if old is None or old.labels != ns.labels:
            self._refresh_ns(ns.name)
            self._reselect_cnp_ns(ns.name)

    def delete_namespace(self, name: str) -> None:
        if self.namespaces.pop(name, None) is not None:
            self._index_ns(name, None)
            self._refresh_ns(name)
            self._reselect_cnp_ns(name)

    def _index_ns(self, name: str, labels: dict[str, str] | None) -> None:
        for item in self._ns_plain.get(name, {}).items():
            names = self._ns_by_label[item]
            names.discard(name)
            if not names:
                del self._ns_by_label[item]
        if labels is None:
            self._ns_plain.pop(name, None)
            if name in self._pods_by_ns:
                self._ns_unknown.add(name)
            return
        self._ns_plain[name] = labels
        self._ns_unknown.discard(name)
        for item in labels.items():
            self._ns_by_label.setdefault(item, set()).add(name)

    def _ns_candidates(self, selector) -> "set[str] | dict[str, set[PodKey]]":
        """Namespaces with pods that may match ``selector``: by its smallest matchLabels
        entry in the label index (plus namespaces we hold pods of but no object for),
        or every namespace with pods."""
        items = selector.match_labels.items_tuple()
        if not items:
            return self._pods_by_ns
        best = min((self._ns_by_label.get(item, set()) for item in items), key=len)
        return {n for n in best if n in self._pods_by_ns} | self._ns_unknown

    def _refresh_ns(self, name: str) -> None:
        """Re-test every namespace-selector scope against this namespace's labels."""
        labels = self._ns_labels(name)
        for defn in self._nssel_scopes:
            st = self._scopes[defn]
            assert defn.ns_selector is not None
            now = selector_matches(defn.ns_selector, labels)
            if now == (name in st.matched_ns):
                continue
            if now:
                st.matched_ns.add(name)
                self._ns_index.setdefault(name, set()).add(defn)
                for key in self._pods_by_ns.get(name, ()):
                    self._scope_pod(st, key, self.pods[key])
            else:
                st.matched_ns.discard(name)
                self._ns_index_discard(name, defn)
                for key in self._pods_by_ns.get(name, ()):
                    self._scope_pod(st, key, None)

    def _ns_index_discard(self, name: str, defn: ScopeDef) -> None:
        s = self._ns_index.get(name)
        if s is not None:
            s.discard(defn)
            if not s:
                del self._ns_index[name]

    # --- pods -----------------------------------------------------------------------

    def upsert_pod(self, pod: Pod) -> None:
        key = pod.key
        old = self.pods.get(key)
        if old == pod:
            return
        self.pods[key] = pod
        if old is not None:
            # cached members are of the old object: dropped here, so a cached entry
            # always belongs to the current pod (which was eligible when it was made)
            self._plain_members.pop(key, None)
            self._plain_of.pop(key, None)
        if old is None or old.labels is not pod.labels:
            self._pod_labels[key] = pod.labels.plain()  # shared with the pod, never modified
        ns_pods = self._pods_by_ns.get(pod.namespace)
        if ns_pods is None:
            ns_pods = self._pods_by_ns[pod.namespace] = {}
            if pod.namespace not in self._ns_plain:
                self._ns_unknown.add(pod.namespace)
        labels = ns_pods[key] = self._pod_labels[key]
        postings = self._postings.get(pod.namespace)
        if postings:
            for (k, v), keys in postings.items():
                if labels.get(k) == v:
                    keys.add(key)
                else:
                    keys.discard(key)
        for defn in self._ns_index.get(pod.namespace, ()):
            self._scope_pod(self._scopes[defn], key, pod)
        if old is None and len(ns_pods) == 1:
            # A namespace without pods is not in the namespace-selector scopes' index.
            self._refresh_ns(pod.namespace)
        self._update_local(key)

    def delete_pod(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if self.pods.pop(key, None) is None:
            return
        self._plain_members.pop(key, None)
        self._plain_of.pop(key, None)
        self._pod_labels.pop(key, None)
        ns_pods = self._pods_by_ns.get(namespace)
        if ns_pods is not None:
            ns_pods.pop(key, None)
            if not ns_pods:
                del self._pods_by_ns[namespace]
                self._ns_unknown.discard(namespace)
                self._postings.pop(namespace, None)
            else:
                for keys in self._postings.get(namespace, {}).values():
                    keys.discard(key)
        for defn in self._ns_index.get(namespace, ()):
            self._scope_pod(self._scopes[defn], key, None)
        self._update_local(key)

    def _is_local(self, pod: Pod) -> bool:
        return pod.node_name == self.node.node_name and not pod.host_network and not pod.terminated

    def _update_local(self, key: PodKey) -> None:
        pod = self.pods.get(key)
        ns = key[0]
        is_local = pod is not None and self._is_local(pod)
        if not is_local and key not in self._local:
            return  # a remote pod only moves ipset members
        self._ep_dirty.add(key)
        if is_local:
            self._local.add(key)
            self._local_by_ns.setdefault(ns, set()).add(key)
            sel = {
                pk for pk in self._pols_by_ns.get(ns, ()) if selector_matches(self.policies[pk].pod_selector, self._pod_labels[key])
            }
        else:
            if key in self._local:
                self._local.discard(key)
                self._local_by_ns[ns].discard(key)
                if not self._local_by_ns[ns]:
                    del self._local_by_ns[ns]
            sel = set()
        old = self._ep_policies.get(key, set())
        # activations first: a scope shared by a policy going and one coming stays alive
        for pk in sel - old:
            selected = self._pol_selected[pk]
            selected.add(key)
            if len(selected) == 1:
                self._activate(pk)
        for pk in old - sel:
            selected = self._pol_selected[pk]
            selected.discard(key)
            if not selected:
                self._deactivate(pk)
        if sel:
            self._ep_policies[key] = sel
        else:
            self._ep_policies.pop(key, None)
        self._reselect_cnp(key)

    # --- policies ---------------------------------------------------------------------

    def upsert_policy(self, pol: NetworkPolicy) -> None:
        key = pol.key
        old = self.policies.get(key)
        if old == pol:
            return
        # The old version's scopes are let go only after the new one took its own: a
        # scope both reference stays alive (and filled) across the update.
        held = self._pol_scopes.pop(key, set())
        if old is not None:
            self._unlink_policy(key)
        self.policies[key] = pol
        self._pols_by_ns.setdefault(pol.namespace, set()).add(key)
        selected = {
            pk
            for pk in self._local_by_ns.get(pol.namespace, ())
            if selector_matches(pol.pod_selector, self._pod_labels[pk])
        }
        self._pol_selected[key] = selected
        for pk in selected:
            self._ep_policies.setdefault(pk, set()).add(key)
        self._ep_dirty |= selected
        if selected:
            self._activate(key)
        self._unref_scopes(held)

    def delete_policy(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key not in self.policies:
            return
        self._unlink_policy(key)
        del self.policies[key]
        s = self._pols_by_ns[namespace]
        s.discard(key)
        if not s:
            del self._pols_by_ns[namespace]

    def _unlink_policy(self, key: PolicyKey) -> None:
        for pk in self._pol_selected.pop(key, set()):
            self._ep_dirty.add(pk)
            eps = self._ep_policies[pk]
            eps.discard(key)
            if not eps:
                del self._ep_policies[pk]
        if key in self._pol_scopes:
            self._deactivate(key)
        ref = f"{key[0]}/{key[1]}"
        for family in (4, 6):
            for direction in ch.DIRECTIONS:
                self._pol_cache.pop((ref, family, direction), None)
                if family in self._tables:
                    self._tables[family].dirty.add(("pol", ref, direction))

    def _activate(self, key: PolicyKey) -> None:
        defs = ch.policy_scopes(self.policies[key])
        self._pol_scopes[key] = defs
        self._ref_scopes(defs)

    def _deactivate(self, key: PolicyKey) -> None:
        self._unref_scopes(self._pol_scopes.pop(key, set()))

    def _ref_scopes(self, defs: set[ScopeDef]) -> None:
        for d in defs:
            st = self._scopes.get(d)
            if st is None:
                st = self._create_scope(d)
            st.refs += 1

    def _unref_scopes(self, defs: set[ScopeDef]) -> None:
        for d in defs:
            st = self._scopes[d]
            st.refs -= 1
            if st.refs == 0:
                self._drop_scope(st)

    # --- cluster network policies and nodes ------------------------------------------

    def _cnp_selects(self, cnp: ClusterNetworkPolicy, key: PodKey) -> bool:
        return selector_matches(cnp.subject_namespaces, self._ns_labels(key[0])) and selector_matches(
            cnp.subject_pods, self._pod_labels[key]
        )

    def _reselect_cnp(self, key: PodKey) -> None:
        """Which CNPs select this endpoint (none once it is no longer local)."""
        if not self.cluster_policies and key not in self._ep_cnps:
            return
        if key in self._local:
            sel = {n for n, c in self.cluster_policies.items() if self._cnp_selects(c, key)}
        else:
            sel = set()
        old = self._ep_cnps.get(key, set())
        if sel == old:
            return
        self._ep_dirty.add(key)
        for n in sel - old:  # activations first, as _update_local
            selected = self._cnp_selected[n]
            selected.add(key)
            if len(selected) == 1:
                self._cnp_activate(n)
        for n in old - sel:
            selected = self._cnp_selected[n]
            selected.discard(key)
            if not selected:
                self._cnp_deactivate(n)
        if sel:
            self._ep_cnps[key] = sel
        else:
            self._ep_cnps.pop(key, None)

    def _reselect_cnp_ns(self, name: str) -> None:
        if self.cluster_policies:
            for key in list(self._local_by_ns.get(name, ())):
                self._reselect_cnp(key)

    def upsert_cluster_policy(self, cnp: ClusterNetworkPolicy) -> None:
        old = self.cluster_policies.get(cnp.name)
        if old == cnp:
            return
        held = self._cnp_scopes.pop(cnp.name, set())  # as upsert_policy: released after the new refs
        if old is not None:
            self._unlink_cnp(cnp.name)
        self.cluster_policies[cnp.name] = cnp
        selected = {k for k in self._local if self._cnp_selects(cnp, k)}
        self._cnp_selected[cnp.name] = selected
        for k in selected:
            self._ep_cnps.setdefault(k, set()).add(cnp.name)
        self._ep_dirty |= selected
        if selected:
            self._cnp_activate(cnp.name)
        self._unref_scopes(held)

    def delete_cluster_policy(self, name: str) -> None:
        if name not in self.cluster_policies:
            return
        self._unlink_cnp(name)
        del self.cluster_policies[name]

    def _unlink_cnp(self, name: str) -> None:
        for k in self._cnp_selected.pop(name, set()):
            self._ep_dirty.add(k)
            names = self._ep_cnps[k]
            names.discard(name)
            if not names:
                del self._ep_cnps[k]
        if name in self._cnp_scopes:
            self._cnp_deactivate(name)
        self._drop_cnp_chains(name, ch.DIRECTIONS)

    def _drop_cnp_chains(self, name: str, directions) -> None:
        for family in (4, 6):
            for direction in directions:
                self._cnp_cache.pop((name, family, direction), None)
                if family in self._tables:
                    self._tables[family].dirty.add(("cnp", name, direction))

    def _cnp_activate(self, name: str) -> None:
        defs = ch.cnp_scopes(self.cluster_policies[name])
        self._cnp_scopes[name] = defs
        self._ref_scopes(defs)

    def _cnp_deactivate(self, name: str) -> None:
        self._unref_scopes(self._cnp_scopes.pop(name, set()))

    def upsert_node(self, node: Node) -> None:
        old = self.nodes.get(node.name)
        self.nodes[node.name] = node
        if old is None or old.labels != node.labels or old.addresses != node.addresses:
            self._nodes_changed()

    def delete_node(self, name: str) -> None:
        if self.nodes.pop(name, None) is not None:
            self._nodes_changed()

    def _nodes_changed(self) -> None:
        """Node address sets live in the chains' Built: rebuild the CNP chains with node peers."""
        for name, cnp in self.cluster_policies.items():
            if ch.cnp_has_node_peers(cnp):
                self._drop_cnp_chains(name, ("egress",))

    def _cnp_built(self, name: str, family: int, direction: str) -> ch.Built:
        ck = (name, family, direction)
        built = self._cnp_cache.get(ck)
        if built is None:
            built = ch.cnp_chain(self.node, family, self.cluster_policies[name], direction, self.nodes.values())
            self._cnp_cache[ck] = built
        return built

    def _cnp_lists(self, names: set[str]) -> dict[str, tuple[tuple[str, int], ...]]:
        """EndpointView fields: per tier and direction, (name, priority) by priority then name.

        Equal priorities: the API leaves the order to the implementation; we take the
        name order, so the result is at least deterministic (as kube-network-policies).
        """
        lists: dict[str, list[tuple[int, str]]] = {}
        for n in names:
            cnp = self.cluster_policies[n]
            tier = "admin" if cnp.tier is CNPTier.ADMIN else "baseline"
            for direction in ch.DIRECTIONS:
                if cnp.rules(direction):  # no rules in a direction: no effect on it
                    lists.setdefault(f"{tier}_{direction}", []).append((cnp.priority, n))
        return {k: tuple((n, p) for p, n in sorted(v)) for k, v in lists.items()}

    # --- scopes -----------------------------------------------------------------------

    def _create_scope(self, d: ScopeDef) -> _Scope:
        st = self._scopes[d] = _Scope(d)
        if d.namespace is not None:
            names: list[str] = [d.namespace]
        else:
            assert d.ns_selector is not None
            self._nssel_scopes.add(d)
            # a namespace without pods adds no member
            names = [n for n in self._ns_candidates(d.ns_selector) if selector_matches(d.ns_selector, self._ns_labels(n))]
        keys: list[PodKey] = []
        for n in names:
            st.matched_ns.add(n)
            self._ns_index.setdefault(n, set()).add(d)
            ns_pods = self._pods_by_ns.get(n)
            if ns_pods:
                keys += self._matching(n, d.pod_selector, ns_pods)
        self._fill_scope(st, keys)
        return st

    def _matching(self, ns: str, selector, pods: dict[PodKey, dict[str, str]]) -> list[PodKey]:
        """The pods of ``ns`` (``pods``: key -> plain labels) a pod selector matches."""
        items = selector.match_labels.items_tuple()
        if not items:
            if not selector.match_expressions:
                return list(pods)
            return [key for key, labels in pods.items() if selector_matches(selector, labels)]
        item = items[0]
        postings = self._postings.get(ns)
        if postings is None:
            postings = self._postings[ns] = {}
        keys = postings.get(item)
        if keys is None:
            k, v = item
            keys = postings[item] = {key for key, labels in pods.items() if labels.get(k) == v}
        if len(items) == 1 and not selector.match_expressions:
            return list(keys)
        return [key for key in keys if selector_matches(selector, pods[key])]

    def _fill_scope(self, st: _Scope, keys: list[PodKey]) -> None:
        """A new scope's members from the pods its selectors match, in one pass.

        What ``_scope_pod`` would do for each, minus the change tracking: the scope has
        no ipset built yet, so there is no earlier version to describe a change from.
        """
        assert not st.cache and not st.pod_members
        d = st.defn
        pods = self.pods
        plain_members, plain_of = self._plain_members, self._plain_of
        pod_members = st.pod_members
        found: list[tuple[int, str]] = []
        plain = d.named_port is None
        for key in keys:
            new = plain_members.get(key) if plain else None
            if new is None:  # (a cached entry is the current pod's, made when it was eligible)
                pod = pods[key]
                if not eligible(pod):
                    continue
                new = d.members_of(pod)
                if plain:  # formatting addresses is the slow part: once per pod
                    plain_members[key] = new
                    plain_of[key] = pod
            if new:
                pod_members[key] = new
                found += new
        if found:
            for fam in (4, 6):
                st.counts[fam].update([m for f, m in found if f == fam])
            self._changed_scopes.add(d)

    def _drop_scope(self, st: _Scope) -> None:
        d = st.defn
        for n in st.matched_ns:
            self._ns_index_discard(n, d)
        self._nssel_scopes.discard(d)
        del self._scopes[d]

    def _scope_pod(self, st: _Scope, key: PodKey, pod: Pod | None) -> None:
        d = st.defn
        if pod is not None and eligible(pod) and selector_matches(d.pod_selector, self._pod_labels[key]):
            if d.named_port is None:
                new = self._plain_members.get(key)
                if new is None or self._plain_of.get(key) is not pod:
                    new = d.members_of(pod)  # formatting addresses is the slow part: once per pod
                    self._plain_members[key] = new
                    self._plain_of[key] = pod
            else:
                new = d.members_of(pod)
        else:
            new = ()
        old = st.pod_members.get(key, ())
        if new == old:
            return
        cache = st.cache
        for fam, m in old:
            c = st.counts[fam]
            n = c[m] - 1
            if n:
                c[m] = n
            else:
                del c[m]
                if fam in cache:
                    st.added[fam].discard(m)
                    st.removed[fam].add(m)
        for fam, m in new:
            c = st.counts[fam]
            n = c.get(m, 0)
            c[m] = n + 1
            if not n and fam in cache:
                st.removed[fam].discard(m)
                st.added[fam].add(m)
        for fam, cached in list(cache.items()) if cache else ():
            # a set nobody asks for any more (family off, scope unused there): rebuild later
            if len(st.added[fam]) + len(st.removed[fam]) > len(cached.members) // 2 + 16:
                del cache[fam]
                st.added[fam].clear()
                st.removed[fam].clear()
        self._changed_scopes.add(d)
        if new:
            st.pod_members[key] = new
        else:
            del st.pod_members[key]

    def _scope_ipset(self, d: ScopeDef, family: int) -> IPSet:
        st = self._scopes[d]
        s = st.cache.get(family)
        added, removed = st.added[family], st.removed[family]
        if s is not None and not added and not removed:
            return s
        if s is not None:
            s = IPSet.derived(s, added, removed)  # carries the change down to the dataplane
        else:
            s = IPSet(d.set_name(family), family, "hash:ip,port" if d.named_port else "hash:net",
                      frozenset(st.counts[family]), d.origin)
        added.clear()
        removed.clear()
        st.cache[family] = s
        return s

    # --- output ------------------------------------------------------------------------

    def _refs(self, key: PodKey, ptype: PolicyType) -> tuple[str, ...]:
        pols = self._ep_policies.get(key, ())
        return tuple(sorted(f"{p[0]}/{p[1]}" for p in pols if self.policies[p].governs(ptype)))

    def _policy_built(self, ref: str, family: int, direction: str) -> ch.Built:
        ck = (ref, family, direction)
        built = self._pol_cache.get(ck)
        if built is None:
            ns, name = ref.split("/", 1)
            built = ch.policy_chain(self.node, family, self.policies[(ns, name)], direction)
            self._pol_cache[ck] = built
        return built

    def _refresh_endpoints(self) -> None:
        """Recompute the LocalEndpoint and endpoint chains of dirty endpoints only."""
        for key in self._ep_dirty:
            pod = self.pods.get(key)
            if key not in self._local or pod is None:
                if self._ep_out.pop(key, None) is not None:
                    del self._ep_keys[bisect_left(self._ep_keys, key)]
                for family in self.families:
                    self._set_ep_view(family, key, None)
                continue
            ing = self._refs(key, PolicyType.INGRESS)
            egr = self._refs(key, PolicyType.EGRESS)
            iface = naming.veth_name(self.node.iface_prefix, key[0], key[1])
            ep = LocalEndpoint(key[0], key[1], iface, tuple(str(ip) for ip in pod.ips), ing, egr, bool(ing), bool(egr))
            if key not in self._ep_out:
                insort(self._ep_keys, key)
            self._ep_out[key] = ep
            for family in self.families:
                ips = tuple(str(ip) for ip in pod.ips_of(family))
                # no address in this family: not in its dispatch, so dropped as unknown
                view = ch.EndpointView(key[0], key[1], iface, ips, ing, egr, 32 if family == 4 else 128) if ips else None
                if view is not None and key in self._ep_cnps:
                    view = replace(view, **self._cnp_lists(self._ep_cnps[key]))
                self._set_ep_view(family, key, view)
        if self._ep_dirty:
            self._endpoints = tuple(map(self._ep_out.__getitem__, self._ep_keys))
        self._ep_dirty.clear()

    def _set_ep_view(self, family: int, key: PodKey, view: ch.EndpointView | None) -> None:
        fam = self._ep_fam[family]
        old = fam.get(key)
        if (old[0] if old else None) == view:
            return
        t = self._tables[family]
        t.swap_endpoint_members(old[0] if old else None, view)
        if old is not None:
            for owner in _policy_owners(old[0]):
                t.pol_refs[owner] -= 1
                if not t.pol_refs[owner]:
                    del t.pol_refs[owner]
                    t.dirty.add(owner)
            del fam[key]
            t.ifaces[(old[0].iface, old[0].ref)] -= 1
            if not t.ifaces[(old[0].iface, old[0].ref)]:
                del t.ifaces[(old[0].iface, old[0].ref)]
        if view is not None:
            fam[key] = (view, ch.endpoint_chains(self.node, family, view))
            t.ifaces[(view.iface, view.ref)] += 1
            for owner in _policy_owners(view):
                t.pol_refs[owner] += 1
                if t.pol_refs[owner] == 1:
                    t.dirty.add(owner)
        t.dirty.add(("ep", key))
        t.ifaces_dirty = True

    def _sync_table(self, family: int) -> None:
        """Swap the contribution of every dirty owner (endpoint or policy chain)."""
        t = self._tables[family]
        cnp_touched = False
        for owner in t.dirty:
            if owner[0] == "ep":
                hit = self._ep_fam[family].get(owner[1])
                t.put(owner, hit[1] if hit else None)
            elif owner[0] == "cnp":
                _, name, direction = owner
                t.put(owner, self._cnp_built(name, family, direction) if owner in t.pol_refs else None)
                cnp_touched = True
            else:
                _, ref, direction = owner
                t.put(owner, self._policy_built(ref, family, direction) if owner in t.pol_refs else None)
        t.dirty.clear()
        if cnp_touched:
            # pa-cnp-accept / pa-cnp-pass exist while some CNP chain is rendered
            used = any(o[0] == "cnp" for o in t.pol_refs)
            t.put(("cnp-helpers",), self._cnp_helpers if used else None)
        if t.ifaces_dirty:
            t.ifaces_dirty = False
            ifaces = tuple(sorted(t.ifaces))
            if ifaces != t.dispatch_key:
                t.dispatch_key = ifaces
                t.put(("dispatch",), ch.Built(chains=ch.dispatch_chains(self.node, list(ifaces))))

    def desired(self) -> DesiredState:
        self._refresh_endpoints()
        chains: dict[tuple[int, str], Mapping[str, Chain]] = {}
        ipsets: dict[str, IPSet] = {}
        for family in self.families:
            self._sync_table(family)
            t = self._tables[family]
            chains[(family, FILTER)] = t.output()
            ipsets.update(t.static_sets)
            ep_set = t.endpoints_set()
            ipsets[ep_set.name] = ep_set
            for d in t.scopes_gone:
                if d not in t.scope_refs:
                    t.scope_sets.pop(d.set_name(family), None)
            for d in t.scopes_new | (self._changed_scopes & t.scope_refs.keys()):
                if d in t.scope_refs:
                    s = self._scope_ipset(d, family)
                    t.scope_sets[s.name] = s
            t.scopes_gone.clear()
            t.scopes_new.clear()
            ipsets.update(t.scope_sets)
        self._changed_scopes.clear()
        return DesiredState(chains, _HOOKS, dict(sorted(ipsets.items())), self._endpoints)


def _policy_owners(view: ch.EndpointView) -> list[tuple[str, str, str]]:
    out = [("pol", r, "ingress") for r in view.ingress] + [("pol", r, "egress") for r in view.egress]
    for tier in (CNPTier.ADMIN, CNPTier.BASELINE):
        for direction in ch.DIRECTIONS:
            out += [("cnp", n, direction) for n, _ in view.cnps(tier, direction)]
    return out


class _FamilyTable:
    """The chains and ipsets of one family, as the sum of per-owner contributions.

    Owners are ("ep", pod key), ("pol", ref, direction) and ("dispatch",); each
    contributes one Built. Changing an owner removes its old Built and adds the
    new one, so an event costs what it touches, not the size of the node.
    """

    def __init__(self, static: dict[str, Chain], family: int) -> None:
        self.family = family
        self.chains: dict[str, Chain] = dict(static)
        self.owners: dict[tuple, ch.Built] = {}
        self.static_sets: dict[str, IPSet] = {}
        self._set_refs: Counter = Counter()
        self.scope_refs: Counter = Counter()
        self.pol_refs: Counter = Counter()  # ("pol", ref, direction) -> endpoints referencing it
        self.dirty: set[tuple] = set()
        self.ifaces_dirty = True
        self.ifaces: Counter = Counter()  # (interface, "ns/pod") of the endpoint views -> how many
        self.dispatch_key: tuple[tuple[str, str], ...] | None = None
        self._out: dict[str, Chain] | None = None
        # output() without sorting every chain: the last output (handed out: never
        # modified), the chain names in order, and the names put() touched since
        self._last_out: dict[str, Chain] | None = None
        self._names: list[str] = sorted(self.chains)
        self._touched: set[str] = set()
        self.scope_sets: dict[str, IPSet] = {}  # cached ipsets of scope_refs
        self.scopes_new: set[ScopeDef] = set()  # referenced since the last desired()
        self.scopes_gone: set[ScopeDef] = set()  # no longer referenced since then
        # the local-endpoints set (anti-spoofing), referenced by the static chains
        self._ep_members: Counter = Counter()
        self._ep_set: IPSet | None = None

    def swap_endpoint_members(self, old: ch.EndpointView | None, new: ch.EndpointView | None) -> None:
        """An endpoint's entries (address, interface) change from old's to new's."""
        before = ch.endpoint_set_members(old) if old is not None else frozenset()
        after = ch.endpoint_set_members(new) if new is not None else frozenset()
        if before == after:
            return  # e.g. only its policies changed: the set object stays the same
        for m in before:
            self._ep_members[m] -= 1
            if not self._ep_members[m]:
                del self._ep_members[m]
        for m in after:
            self._ep_members[m] += 1
        self._ep_set = None

    def endpoints_set(self) -> IPSet:
        """Cached until an endpoint's addresses or interface change."""
        if self._ep_set is None:
            self._ep_set = ch.local_endpoints_set(self.family, frozenset(self._ep_members))
        return self._ep_set

    def put(self, owner: tuple, built: ch.Built | None) -> None:
        old = self.owners.get(owner)
        if old is built:
            return
        self._out = None
        if old is not None:
            del self.owners[owner]
            for name in old.chains:
                del self.chains[name]
            self._touched.update(old.chains)
            for name in old.ipsets:
                self._set_refs[name] -= 1
                if not self._set_refs[name]:
                    del self._set_refs[name]
                    del self.static_sets[name]
            for d in old.scopes.values():
                self.scope_refs[d] -= 1
                if not self.scope_refs[d]:
                    del self.scope_refs[d]
                    self.scopes_gone.add(d)
        if built is not None:
            self.owners[owner] = built
            self.chains.update(built.chains)
            self._touched.update(built.chains)
            for name, s in built.ipsets.items():
                self._set_refs[name] += 1
                self.static_sets[name] = s
            for d in built.scopes.values():
                self.scope_refs[d] += 1
                if self.scope_refs[d] == 1:
                    self.scopes_new.add(d)

    def output(self) -> dict[str, Chain]:
        """A fresh sorted dict (earlier DesiredStates stay unchanged); cached until a change."""
        if self._out is None:
            chains, last = self.chains, self._last_out
            if last is None:
                self._names = sorted(chains)
                out = {n: chains[n] for n in self._names}
            else:
                gone = [n for n in self._touched if n not in chains and n in last]
                new = [n for n in self._touched if n in chains and n not in last]
                if not gone and not new:
                    out = dict(last)  # same names, same order: only values to swap
                    for n in self._touched:
                        out[n] = chains[n]
                else:
                    names = self._names
                    for n in gone:
                        del names[bisect_left(names, n)]
                    for n in new:
                        insort(names, n)
                    out = {n: chains[n] for n in names}
            self._touched = set()
            self._out = self._last_out = out
        return self._out


_HOOKS = tuple(
    Hook(FILTER, builtin, ours)
    for builtin, ours in (
        ("FORWARD", naming.CHAIN_FORWARD),
        ("INPUT", naming.CHAIN_INPUT),
        ("OUTPUT", naming.CHAIN_OUTPUT),
    )
)


def compile(snapshot: ClusterSnapshot, node: NodeConfig) -> DesiredState:  # noqa: A001 - the public name
    """Full compile: a fresh Compiler fed the snapshot."""
    state = Compiler(node).load(snapshot).desired()
    log.debug(
        "compiled",
        node=node.node_name,
        endpoints=len(state.endpoints),
        ipsets=len(state.ipsets),
        chains=sum(len(t) for t in state.chains.values()),
    )
    return state
