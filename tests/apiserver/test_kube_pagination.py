"""How the informers list, against the real kube-apiserver: the first list from the watch
cache (resourceVersion=0: one response, the cache ignores limit), the consistent list
from etcd in pages (limit/continue), a continue token that expires mid-list (410:
the list starts again), a watch cache that cannot serve our resourceVersion (504:
the paginated list instead), and the streaming decoder the lists go through.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import uuid

import pytest
from kube_helpers import Recorder, namespace_yaml, apply, server_state, wait_converged

from policy_agent.sources.kube import KubeSource, WatchOptions, iter_list_items

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(2400)]
N_PODS = 1200


@pytest.fixture(scope="module")
def many_pods(cluster):
    """A namespace with N_PODS pods (created once for the module)."""
    from kubernetes import client

    ns = f"pa-kube-pages-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    apply(cluster, namespace_yaml(ns))
    api = cluster.api_client()
    core = client.CoreV1Api(api)

    def create(i: int) -> None:
        core.create_namespaced_pod(ns, {
            "metadata": {"name": f"p-{i:04d}", "labels": {"app": f"a{i % 7}", "rev": "1"}},
            "spec": {"nodeName": f"node-{i % 5}", "containers": [{"name": "c", "image": "registry.invalid/pause:1"}]},
        })

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        for f in [ex.submit(create, i) for i in range(N_PODS)]:
            f.result()
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def ours(src: KubeSource, ns: str) -> dict:
    return {k: v for k, v in src.cache("Pod").items() if k[0] == ns}


def test_first_list_comes_from_the_watch_cache_in_one_response(cluster, many_pods):
    rec = Recorder()
    src = KubeSource(rec, cluster.api_client(), kinds=("Pod",), options=WatchOptions(page_size=500)).start()
    try:
        assert src.wait_synced(120)
        inf = src.informers["Pod"]
        assert inf.list_mode == "cache"
        if cluster.local is not None:  # kube-apiserver 1.20: the watch cache ignores limit at RV=0
            assert inf.list_pages == 1
        assert len(ours(src, many_pods)) == N_PODS
        wait_converged(cluster, src, rec, kinds=("Pod",))
    finally:
        src.close()


def test_consistent_list_pages_with_limit_and_continue(cluster, many_pods):
    rec = Recorder()
    opts = WatchOptions(page_size=500, list_from_cache=False)
    src = KubeSource(rec, cluster.api_client(), kinds=("Pod",), options=opts).start()
    try:
        assert src.wait_synced(120)
        inf = src.informers["Pod"]
        total = len(server_state(cluster, "Pod"))
        assert inf.list_mode == "pages" and total >= N_PODS
        assert inf.list_pages == -(-total // 500) >= 3  # 1,200 of ours alone: 3 pages of 500
        assert len(ours(src, many_pods)) == N_PODS
        wait_converged(cluster, src, rec, kinds=("Pod",))
    finally:
        src.close()


class _CompactBeforeSecondPage:
    """The real transport, but before the first ``continue`` request a pod changes and
    etcd is compacted past the list's revision: that continue token has expired."""

    def __init__(self, real, cluster, ns: str) -> None:
        self.real, self.cluster, self.ns, self.fired = real, cluster, ns, False

    def get(self, path, query, timeout):
        if not self.fired and any(k == "continue" for k, _ in query):
            self.fired = True
            from kubernetes import client

            client.CoreV1Api(self.cluster.api_client()).patch_namespaced_pod(
                "p-0007", self.ns, {"metadata": {"labels": {"rev": "2"}}})
            self.cluster.local.compact()
        return self.real.get(path, query, timeout)


def test_expired_continue_token_restarts_the_list(cluster, many_pods):
    if cluster.local is None:
        pytest.skip("needs the local test cluster (etcdctl compaction of its etcd)")
    rec = Recorder()
    opts = WatchOptions(page_size=200, list_from_cache=False)
    src = KubeSource(rec, cluster.api_client(), kinds=("Pod",), options=opts)
    inf = src.informers["Pod"]
    inf._transport = _CompactBeforeSecondPage(inf._transport, cluster, many_pods)
    src.start()
    try:
        assert src.wait_synced(120)
        assert inf._transport.fired and inf.list_restarts == 1 and inf.list_mode == "pages"
        pods = ours(src, many_pods)
        assert len(pods) == N_PODS
        # the restarted list saw the change made while the first one was paging
        assert pods[(many_pods, "p-0007")].labels["rev"] == "2"
        wait_converged(cluster, src, rec, kinds=("Pod",))
    finally:
        src.close()


def test_watch_cache_behind_our_resource_version_falls_back_to_pages(cluster, many_pods):
    """A relist asks the cache for "not older than ours"; a cache that is behind answers
    504 (too large resource version) after a few seconds: list from etcd in pages."""
    if cluster.local is None:
        pytest.skip("needs kube-apiserver 1.20's watch cache semantics")
    rec = Recorder()
    src = KubeSource(rec, cluster.api_client(), kinds=("Pod",), options=WatchOptions(page_size=500))
    inf = src.informers["Pod"]
    inf.listed.set()  # as after a first list ...
    inf.resource_version = str(10**15)  # ... at a revision this server has never reached
    inf._list()
    assert inf.list_mode == "pages"
    assert len(ours(src, many_pods)) == N_PODS
    assert {k: o.resource_version for k, o in src.cache("Pod").items()} == server_state(cluster, "Pod")


class _Chunks:
    def __init__(self, body: bytes, size: int) -> None:
        self.body, self.size = body, size

    def stream(self, amt, decode_content=True):
        for i in range(0, len(self.body), self.size):
            yield self.body[i:i + self.size]


def test_streaming_decoder_equals_json_loads_for_any_chunking():
    rng = random.Random(7)
    for _ in range(200):
        items = [{"metadata": {"name": f"p{i}-é", "n": rng.randint(0, 10**12)}, "v": [1.5, True, None, 'q"\\']}
                 for i in range(rng.randint(0, 25))]
        doc = {"kind": "PodList", "metadata": {"resourceVersion": "42", "continue": "tok"}, "items": items, "n": 12345}
        body = json.dumps(doc, ensure_ascii=False, indent=rng.choice([None, 1])).encode()
        top: dict = {}
        assert list(iter_list_items(_Chunks(body, rng.randint(1, 64)), top)) == items
        assert top == {k: v for k, v in doc.items() if k != "items"}


@pytest.mark.parametrize("body", [b'{"items": [{"a": 1}, {"b"', b'{"items": [{"a": 1}}', b"", b'{"metadata": tru}'])
def test_streaming_decoder_rejects_broken_bodies(body):
    with pytest.raises(ValueError):
        list(iter_list_items(_Chunks(body, 3), {}))
