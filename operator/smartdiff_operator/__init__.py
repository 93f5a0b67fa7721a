"""The Smart-Diffusion Kubernetes operator (kopf).

Reconciles ``VideoGeneration`` resources into GPU Jobs. Never imports torch:
the operator image has none (checked by import-linter).
"""
