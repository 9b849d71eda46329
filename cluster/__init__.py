"""Cluster provisioning assets (ray up / KubeRay / Dockerfile) and the local multi-node Ray helper."""
