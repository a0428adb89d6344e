"""A real Kubernetes cluster on this machine (issue 11): control plane and nodes in network
namespaces, the project's manifests applied. Entry point: scripts/cluster.sh
(`python -m policy_agent.lab.cluster`); layout and guarantees: docs/cluster.md.
"""
