"""Environment variables of a runtime pod: the contract between operator and worker.

The operator (``smartdiff_operator.manifests``) sets them in the pod spec; the in-pod worker
(``smartdiff.worker``) reads them. Both import the names from here, so they cannot drift.
"""

from typing import Final

ENV_NAME: Final = "SMARTDIFF_VG_NAME"  # the VideoGeneration (downward API)
ENV_NAMESPACE: Final = "SMARTDIFF_VG_NAMESPACE"
ENV_UID: Final = "SMARTDIFF_VG_UID"  # the resource a pod was made for (re-creation guard)
ENV_POD: Final = "SMARTDIFF_POD_NAME"
ENV_NODE: Final = "SMARTDIFF_NODE_NAME"
ENV_OUTPUT_DIR: Final = "SMARTDIFF_OUTPUT_DIR"  # where the MP4 is written (and kept)
ENV_WEIGHTS_URI: Final = "SMARTDIFF_WEIGHTS_URI"  # overrides spec.model.weights (catalog)
ENV_WEIGHTS_ROOT: Final = "SMARTDIFF_WEIGHTS_ROOT"  # mount point of pvc:// weights
ENV_WEIGHTS_CACHE: Final = "SMARTDIFF_WEIGHTS_CACHE"  # node-local cache of s3:// weights
ENV_PROGRESS_INTERVAL: Final = "SMARTDIFF_PROGRESS_INTERVAL_SECONDS"  # status patch throttle
ENV_S3_ENDPOINT: Final = "SMARTDIFF_S3_ENDPOINT"
ENV_S3_REGION: Final = "SMARTDIFF_S3_REGION"
# The GPU count the plan resolved (spec.resources.gpus, else the catalog's defaultGpus).
ENV_GPUS: Final = "SMARTDIFF_GPUS"
