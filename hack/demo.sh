#!/usr/bin/env bash
# The README's first command (`make demo`): bring up the real local control
# plane and S3 server, show them working, and stop them again. It grows into
# "apply a VideoGeneration and get a video" as the operator lands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(mktemp -d /tmp/smartdiff-demo.XXXXXX)
trap 'hack/cluster --root "$root/c" down || true; rm -rf "$root"' EXIT

echo "== starting a local control plane + S3 server (hack/cluster up)"
eval "$(hack/cluster --root "$root/c" up)"
kubectl=$(hack/tools.sh path kubectl)
"$kubectl" version
echo "== kwok GPU nodes"
"$kubectl" get nodes -L nvidia.com/gpu.product -o wide
"$kubectl" get nodes -o custom-columns='NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu'

echo "== a Job asking for 4 GPUs, placed by the real scheduler"
"$kubectl" create job demo-gpu --image=example.invalid/smartdiff-runtime:dev \
  --dry-run=client -o json -- true \
  | python3 -c 'import json,sys; j=json.load(sys.stdin); c=j["spec"]["template"]["spec"]["containers"][0]; c["resources"]={"limits":{"nvidia.com/gpu":"4"}}; print(json.dumps(j))' \
  | "$kubectl" apply -f -
for _ in $(seq 50); do
  node=$("$kubectl" get pods -l job-name=demo-gpu -o jsonpath='{.items[0].spec.nodeName}' 2>/dev/null || true)
  [[ -n $node ]] && break; sleep 0.2
done
"$kubectl" get pods -l job-name=demo-gpu -o wide

out=$root/out
mkdir -p "$out"
if python3 -c 'import smartdiff.cli' 2>/dev/null && [[ -f examples/video.yaml ]]; then
  echo "== generating examples/video.yaml locally (tiny random model on CPU) and uploading to S3"
  python3 - <<'PY'
import boto3, botocore.config
boto3.client("s3", config=botocore.config.Config(signature_version="s3v4")).create_bucket(Bucket="demo")
PY
  smartdiff run examples/video.yaml --output s3://demo/videos/
fi

echo "== S3: a bucket and an object on the local server"
python3 - <<'PY'
import boto3, botocore.config
s3 = boto3.client("s3", config=botocore.config.Config(signature_version="s3v4"))
buckets = {b["Name"] for b in s3.list_buckets()["Buckets"]}
if "demo" not in buckets:
    s3.create_bucket(Bucket="demo")
    s3.put_object(Bucket="demo", Key="hello.txt", Body=b"hello from smart-diffusion\n")
for obj in s3.list_objects_v2(Bucket="demo").get("Contents", []):
    print(f"s3://demo/{obj['Key']}  {obj['Size']} bytes")
PY
echo "== stopping (no process or port is left behind)"
