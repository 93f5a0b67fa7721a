"""The ``smartdiff`` command line: generate one video locally, from flags or from a manifest.

``smartdiff generate --prompt ...`` takes the request as flags; ``smartdiff run video.yaml``
reads the same ``VideoGeneration`` manifest users ``kubectl apply`` and runs it on this machine.
Both go through three phases:

1. plan (no model is touched): flags or manifest -> ``UserParams``/``SystemParams``, the model
   config, the request checked against it, the weights folder, device, attention backend and
   output target. Any bad input ends here with one ``smartdiff: error: <field>: ...`` message
   and exit code 2.
2. generate: the ``Engine`` loads the backend and runs the task, with a progress bar over the
   denoising steps.
3. deliver: frames -> MP4 (``smartdiff.io.video``), then an upload when the output is an S3 URI
   (``smartdiff.io.s3``); a summary line gives the output, its size, SHA-256, the seed and the
   time of every stage. Runtime failures exit 1.

Without weights (no ``--weights``, no ``spec.model.weights``) the CLI runs the tiny RANDOM
model ``wan-tiny-random`` on the CPU at its small default shape, writes the MP4 locally and
says loudly that the video is noise: a demo that works on any machine in seconds.

Talks to: ``smartdiff.api`` (params, manifest), ``smartdiff.models.registry`` (model configs),
``smartdiff.engine`` (imported only once the plan is valid), ``smartdiff.io``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

from smartdiff import __version__
from smartdiff.api.base import describe_errors
from smartdiff.api.params import DTYPES, SOLVERS, SystemParams, UserParams
from smartdiff.api.videogeneration import ManifestError, VideoGeneration
from smartdiff.io.s3 import S3Location

if TYPE_CHECKING:
    from smartdiff.models.registry import ModelConfig

LOG = logging.getLogger("smartdiff.cli")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
DEMO_MODEL: Final = "wan-tiny-random"
# The random-weights stand-in of each model family (same pipeline, tiny shapes).
DEMO_MODEL_OF_FAMILY: Final = {
    "wan2.1-t2v": DEMO_MODEL,
    "wan2.2-t2v-a14b": "wan22-a14b-tiny-random",
    "wan2.2-ti2v": "wan22-ti2v-tiny-random",
}
# Demo runs take these from the tiny model's defaults: they set the cost of a run.
DEMO_SHAPE_FIELDS: Final = ("width", "height", "frames", "fps", "steps")
FLAG_OF: Final = {
    "model": "--model",
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "width": "--width",
    "height": "--height",
    "frames": "--frames",
    "fps": "--fps",
    "steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "guidance_scale_2": "--guidance-scale-2",
    "image": "--image",
    "shift": "--shift",
    "seed": "--seed",
    "solver": "--solver",
    "device": "--device",
    "dtype": "--dtype",
    "attention": "--attention",
    "memory_level": "--memory-level",
}
SPEC_PATH_OF: Final = {
    "model": "spec.model.name",
    "prompt": "spec.prompt",
    "negative_prompt": "spec.negativePrompt",
    "width": "spec.video.width",
    "height": "spec.video.height",
    "frames": "spec.video.frames",
    "fps": "spec.video.fps",
    "steps": "spec.sampling.steps",
    "guidance_scale": "spec.sampling.guidanceScale",
    "guidance_scale_2": "spec.sampling.guidanceScale2",
    "image": "spec.image",
    "shift": "spec.sampling.shift",
    "seed": "spec.sampling.seed",
    "solver": "spec.sampling.solver",
    "dtype": "spec.acceleration.dtype",
    "attention": "spec.acceleration.attention",
    "memory_level": "spec.acceleration.memoryLevel",
    "device": "--device",
}
USER_FLAGS: Final = (
    "model",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "frames",
    "fps",
    "steps",
    "guidance_scale",
    "guidance_scale_2",
    "image",
    "shift",
    "seed",
    "solver",
)
SYSTEM_FLAGS: Final = ("device", "dtype", "attention", "memory_level")


class UsageError(Exception):
    """Bad input, found before any model is loaded: exit code 2 with this message."""


@dataclass(frozen=True)
class Plan:
    """A checked local run.

    Attributes:
        user / system: the request and the process settings.
        model: the model config (``smartdiff.models.registry.ModelConfig``).
        weights: the weights folder, or None for a random-weights model.
        local_path: the MP4 to write, or None when it goes to S3 (staged in a temp folder).
        s3_uri: the object to upload to, or None for a local output.
        demo_note: why random weights run (printed in the banner), None with real weights.
        origin: where each field came from (flag or manifest path), to name it in errors.
    """

    user: UserParams
    system: SystemParams
    model: ModelConfig
    weights: str | Path | None
    local_path: Path | None
    s3_uri: str | None
    demo_note: str | None
    origin: dict[str, str]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartdiff",
        description="Text-to-video generation with Wan2.1 (Smart-Diffusion).",
        epilog="Without weights, the tiny RANDOM model wan-tiny-random runs on the CPU: "
        "its videos are noise (a demo of the pipeline, not of the model).",
    )
    parser.add_argument("--version", action="version", version=f"smartdiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a video from flags")
    generate.add_argument("--prompt", required=True, help="what the video shows")
    generate.add_argument("--negative-prompt", help="what the video should avoid")
    generate.add_argument(
        "--model",
        help=f"model config name (default: wan2.1-t2v-1.3b with --weights, else {DEMO_MODEL})",
    )
    for flag, kind, text in (
        ("--width", int, "frame width, a multiple of 16"),
        ("--height", int, "frame height, a multiple of 16"),
        ("--frames", int, "number of frames, 4n+1"),
        ("--fps", int, "frames per second of the MP4"),
        ("--steps", int, "denoising steps"),
        ("--guidance-scale", float, "classifier-free guidance scale (<= 1 disables CFG)"),
        ("--guidance-scale-2", float, "guidance of the low-noise expert (Wan2.2 A14B)"),
        ("--shift", float, "flow-matching timestep shift"),
        ("--seed", int, "noise seed (default: a random one, printed at the end)"),
    ):
        generate.add_argument(flag, type=kind, help=f"{text} (default: the model's)")
    generate.add_argument("--solver", help=f"one of {', '.join(SOLVERS)} (default: the model's)")
    generate.add_argument(
        "--image",
        help="image-to-video (Wan2.2 TI2V): the first frame, a path, file://, pvc:// or s3://",
    )
    generate.add_argument(
        "--name",
        help="output name used with a directory or s3://.../ "
        "prefix output (default: smartdiff-<UTC time>)",
    )
    _add_common(
        generate,
        output_help="a .mp4 path, a directory, s3://bucket/key.mp4 or "
        "s3://bucket/prefix/ (default: ./<name>.mp4)",
    )

    run = commands.add_parser("run", help="run a VideoGeneration manifest locally")
    run.add_argument("manifest", type=Path, help="a VideoGeneration YAML file (as for kubectl)")
    _add_common(
        run,
        output_help="override spec.output: a .mp4 path, a directory or an s3:// "
        "URI (default: spec.output.uri; ./<name>.mp4 when random weights run)",
    )
    return parser


def _add_common(parser: argparse.ArgumentParser, *, output_help: str) -> None:
    parser.add_argument("--weights", help="weights folder (diffusers layout) or file:///path")
    parser.add_argument("--output", "-o", help=output_help)
    parser.add_argument("--device", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", help=f"one of {', '.join(DTYPES)}")
    parser.add_argument("--attention", help="attention backend (auto, sdpa, ...)")
    parser.add_argument("--memory-level", type=int, help="0 all on GPU .. 3 most offloading")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")


# ----------------------------------------------------------------------------- planning


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _describe(error: ValidationError, origin: dict[str, str]) -> str:
    """pydantic errors as ``<flag or manifest path>: <message>`` lines."""
    lines = []
    for line in describe_errors(error):
        field, _, message = line.partition(": ")
        lines.append(f"{origin.get(field, field)}: {message}")
    return "\n  ".join(lines)


def _load_model(name: str, origin: str) -> ModelConfig:
    from smartdiff.models.registry import ModelConfigError, UnknownModelError, load_model_config

    try:
        return load_model_config(name)
    except (UnknownModelError, ModelConfigError) as error:
        raise UsageError(f"{origin}: {error}") from None


def _weights_path(value: str, origin: str, model: ModelConfig) -> str | Path:
    """Where the model's weights are: a local release folder (official Wan or diffusers
    layout, checked now, before anything loads), or an ``s3://`` / ``pvc://`` URI that the
    backend resolves (S3 is downloaded once into the node-local weights cache)."""
    if model.random_weights:
        raise UsageError(
            f"{origin}: model {model.name!r} has random weights and reads no "
            "checkpoint; drop the weights or choose another model"
        )
    if value.startswith(("s3://", "pvc://")):
        return value
    if value.startswith("file://"):
        value = value.removeprefix("file://")
    elif "://" in value:
        raise UsageError(
            f"{origin}: {value!r} is not allowed: weights are a folder, file://, pvc:// or "
            "s3:// URI"
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise UsageError(f"{origin}: {str(path)!r} {what}; expected a weights folder")
    from smartdiff.io.release import ReleaseLayoutError, detect_release, release_kind

    try:
        detect_release(
            path,
            subfolders=model.weights,
            tokenizer_required=model.text_encoder.tokenizer != "byte-level",
            kind=release_kind(model),
        )
    except (ReleaseLayoutError, ValueError) as error:  # one line: what is there, what lacks
        raise UsageError(f"{origin}: " + "; ".join(str(error).splitlines())) from None
    return path


def _local_output(value: str, *, default_name: str, origin: str) -> Path:
    """The MP4 path for a local output: a file path, or ``<dir>/<default_name>.mp4``."""
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / f"{default_name}.mp4"
    if not path.parent.is_dir():
        raise UsageError(f"{origin}: directory {str(path.parent)!r} does not exist")
    return path.resolve()


def _s3_target(value: str, origin: str, *, prefix_object: str) -> str:
    """Check an s3:// output; a prefix gets ``prefix_object`` appended."""
    try:
        location = S3Location.parse(value, field=origin)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return location.object_for(prefix_object).uri if location.is_prefix else location.uri


def _demo_fields(model: ModelConfig, requested: dict[str, Any]) -> dict[str, Any]:
    """The request for a random-weights demo: the model's defaults for the costly fields."""
    defaults = model.defaults.as_request_fields()
    fields = {**defaults, **requested, "model": model.name}
    fields.update({name: defaults[name] for name in DEMO_SHAPE_FIELDS})
    return fields


def plan_generate(args: argparse.Namespace) -> Plan:
    requested = _given(args, USER_FLAGS)
    weights_value = args.weights
    model_name = requested.get("model") or (
        UserParams.model_fields["model"].default if weights_value else DEMO_MODEL
    )
    model = _load_model(model_name, "--model")
    demo_note = None
    if weights_value is None and not model.random_weights:
        demo = DEMO_MODEL_OF_FAMILY.get(model.family, DEMO_MODEL)
        demo_note = (
            f"no --weights for model {model.name!r}: running {demo!r} at its demo shape instead"
        )
        model = _load_model(demo, "--model")
        fields = _demo_fields(model, requested)
    else:
        fields = {**model.defaults.as_request_fields(), **requested, "model": model.name}
        if model.random_weights and "model" in requested:
            demo_note = f"model {model.name!r} was requested"
        elif model.random_weights:
            demo_note = f"no --weights given, so the demo model {model.name!r} runs"
    user = _user_params(fields, FLAG_OF)
    weights = _weights_path(weights_value, "--weights", model) if weights_value else None
    name = args.name or datetime.now(UTC).strftime("smartdiff-%Y%m%d-%H%M%S")
    if args.name is not None and ("/" in args.name or not args.name.strip()):
        raise UsageError(f"--name: {args.name!r} is not allowed: a file name without '/'")
    local_path, s3_uri = None, None
    if args.output is not None and args.output.startswith("s3://"):
        s3_uri = _s3_target(args.output, "--output", prefix_object=f"{name}.mp4")
    else:
        local_path = _local_output(
            args.output or f"{name}.mp4", default_name=name, origin="--output"
        )
    system = _system_params(args, base={}, random_weights=model.random_weights, origin=FLAG_OF)
    return Plan(
        user=user,
        system=system,
        model=model,
        weights=weights,
        local_path=local_path,
        s3_uri=s3_uri,
        demo_note=demo_note,
        origin=FLAG_OF,
    )


def plan_run(args: argparse.Namespace) -> Plan:
    try:
        manifest = VideoGeneration.from_yaml_file(args.manifest)
    except ManifestError as error:
        raise UsageError(str(error)) from None
    spec = manifest.spec
    name = manifest.name or args.manifest.stem
    requested = spec.to_user_params().model_dump()
    model = _load_model(spec.model.name, "spec.model.name")
    weights_value, weights_origin = args.weights, "--weights"
    if weights_value is None and spec.model.weights is not None:
        weights_value, weights_origin = spec.model.weights, "spec.model.weights"
    demo_note = None
    if weights_value is None and not model.random_weights:
        demo = DEMO_MODEL_OF_FAMILY.get(model.family, DEMO_MODEL)
        demo_note = (
            f"spec.model.weights is unset for model {model.name!r}: running "
            f"{demo!r} at its demo shape instead"
        )
        model = _load_model(demo, "spec.model.name")
        requested = _demo_fields(model, requested)
    elif model.random_weights:
        demo_note = f"model {model.name!r} was requested"
    user = _user_params(requested, SPEC_PATH_OF)
    weights = _weights_path(weights_value, weights_origin, model) if weights_value else None
    # A prefix gets <namespace>/<name>.mp4 appended, as in the cluster (OutputSpec.object_key).
    local_path, s3_uri = None, None
    if args.output is not None and args.output.startswith("s3://"):
        s3_uri = _s3_target(
            args.output, "--output", prefix_object=f"{manifest.namespace}/{name}.mp4"
        )
    elif args.output is None and demo_note is None:
        s3_uri = _s3_target(
            spec.output.object_uri(manifest.namespace, name),
            "spec.output.uri",
            prefix_object=f"{name}.mp4",
        )
    else:  # an explicit local output, or a random-weights demo (noise is not uploaded)
        local_path = _local_output(
            args.output or f"{name}.mp4", default_name=name, origin="--output"
        )
    base = {
        "dtype": spec.acceleration.dtype,
        "attention": spec.acceleration.attention,
        "memory_level": spec.acceleration.memory_level,
    }
    origin = {**SPEC_PATH_OF, **{k: FLAG_OF[k] for k in _given(args, SYSTEM_FLAGS)}}
    system = _system_params(args, base=base, random_weights=model.random_weights, origin=origin)
    if spec.resources.gpus is not None and spec.resources.gpus > 1:
        LOG.warning(
            "spec.resources.gpus=%d: the local CLI runs one process on one device",
            spec.resources.gpus,
        )
    return Plan(
        user=user,
        system=system,
        model=model,
        weights=weights,
        local_path=local_path,
        s3_uri=s3_uri,
        demo_note=demo_note,
        origin=origin,
    )


def _user_params(fields: dict[str, Any], origin: dict[str, str]) -> UserParams:
    try:
        return UserParams(**fields)
    except ValidationError as error:
        raise UsageError(_describe(error, origin)) from None


def _system_params(
    args: argparse.Namespace, *, base: dict[str, Any], random_weights: bool, origin: dict[str, str]
) -> SystemParams:
    fields = dict(base)
    if random_weights:  # the demo runs on the CPU in fp32 unless asked otherwise
        fields.update(device="cpu", dtype="float32")
    fields.update(_given(args, SYSTEM_FLAGS))
    try:
        return SystemParams(**fields)
    except ValidationError as error:
        raise UsageError(_describe(error, origin)) from None


def preflight(plan: Plan) -> None:
    """Checks that need the engine's knowledge (model multiples, device, attention backend);
    they import torch but build no model."""
    origin = plan.origin
    from smartdiff.engine.backend import resolve_attention, resolve_device
    from smartdiff.engine.request import RequestError, check_request

    try:
        check_request(plan.user, plan.model)
    except RequestError as error:
        field = str(error).split("=", 1)[0]
        raise UsageError(f"{origin.get(field, field)}: {error}") from None
    for name, check in (("device", resolve_device), ("attention", resolve_attention)):
        try:
            check(getattr(plan.system, name))
        except (ValueError, RuntimeError) as error:
            raise UsageError(f"{origin.get(name, name)}: {error}") from None


# ----------------------------------------------------------------------------- running


class _Progress:
    """A tqdm bar over the denoising steps, created at the first step."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, task: Any, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc="denoise",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.2,
            )
        self.bar.update(step - self.bar.n)
        if step == total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _banner(plan: Plan) -> None:
    if plan.demo_note is None:
        return
    u = plan.user
    rule = "!" * 78
    lines = [
        rule,
        f"!! RANDOM WEIGHTS: {plan.demo_note}.",
        f"!! {plan.model.name} has random, untrained weights: THE VIDEO WILL BE NOISE.",
        f"!! It shows the pipeline runs ({u.width}x{u.height}, {u.frames} frames, {u.steps} "
        f"steps on {plan.system.device}), not what the model can do.",
        "!! For real videos pass --weights /path/to/Wan2.1-T2V-1.3B-Diffusers.",
        rule,
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def execute(plan: Plan, *, progress: bool, as_json: bool) -> int:
    """Load, generate, write and upload; print the summary. Returns the exit code."""
    from smartdiff.engine.engine import Engine
    from smartdiff.engine.generator import to_uint8_frames
    from smartdiff.engine.task import TaskStatus
    from smartdiff.io.s3 import UploadError, upload_file
    from smartdiff.io.video import VideoEncodeError, write_mp4

    _banner(plan)
    started = time.perf_counter()
    bar = _Progress(progress)
    LOG.info(
        "loading %s (%s) on %s, %s",
        plan.model.name,
        plan.weights or "random weights",
        plan.system.device,
        plan.system.dtype,
    )
    try:
        engine = Engine.from_params(plan.model, plan.system, weights_path=plan.weights, on_step=bar)
        task = engine.submit(plan.user)
        engine.run_until_idle()
    except Exception as error:  # noqa: BLE001 -- reported as one line, exit 1
        _error(f"generation failed: {type(error).__name__}: {error}")
        return EXIT_FAILED
    finally:
        bar.close()
    if task.status is not TaskStatus.SUCCEEDED:
        _error(f"generation {task.status.value}: {task.error}")
        return EXIT_FAILED
    timings = {"load": engine.backend.load_seconds, **task.timings}

    start = time.perf_counter()
    target = plan.local_path
    if target is None:  # staged for the upload; kept if the upload fails
        assert plan.s3_uri is not None
        staging = Path(tempfile.mkdtemp(prefix="smartdiff-"))
        target = staging / plan.s3_uri.rsplit("/", 1)[-1]
    try:
        video = write_mp4(to_uint8_frames(task.video), target, fps=plan.user.fps)
    except (VideoEncodeError, ValueError, OSError) as error:
        _error(f"writing {target} failed: {error}")
        return EXIT_FAILED
    timings["write"] = time.perf_counter() - start
    output = str(video.path)
    if plan.s3_uri is not None:
        start = time.perf_counter()
        try:
            uploaded = upload_file(video.path, plan.s3_uri)
        except (UploadError, ValueError) as error:
            _error(str(error))
            return EXIT_FAILED
        timings["upload"] = time.perf_counter() - start
        output = uploaded.uri
        shutil.rmtree(video.path.parent, ignore_errors=True)  # the staging folder
    timings["total"] = time.perf_counter() - started
    _summary(
        plan,
        output=output,
        size=video.bytes,
        sha256=video.sha256,
        seed=task.seed,
        timings=timings,
        as_json=as_json,
    )
    return EXIT_OK


def _summary(
    plan: Plan,
    *,
    output: str,
    size: int,
    sha256: str,
    seed: int | None,
    timings: dict[str, float],
    as_json: bool,
) -> None:
    u = plan.user
    if as_json:
        print(
            json.dumps(
                {
                    "output": output,
                    "bytes": size,
                    "sha256": sha256,
                    "seed": seed,
                    "model": plan.model.name,
                    "randomWeights": plan.demo_note is not None,
                    "width": u.width,
                    "height": u.height,
                    "frames": u.frames,
                    "fps": u.fps,
                    "steps": u.steps,
                    "timings": {k: round(v, 4) for k, v in timings.items()},
                }
            )
        )
        return
    stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in timings.items())
    noise = " [RANDOM WEIGHTS: noise]" if plan.demo_note else ""
    print(
        f"smartdiff: wrote {output} ({size} bytes, sha256 {sha256}) | {plan.model.name} "
        f"{u.width}x{u.height}x{u.frames}@{u.fps}fps, {u.steps} steps, seed {seed}{noise} | "
        f"{stages}",
        flush=True,
    )


def _error(message: str) -> None:
    print(f"smartdiff: error: {message}", file=sys.stderr, flush=True)


def _logging(quiet: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("smartdiff: %(message)s"))
    root = logging.getLogger("smartdiff")
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``smartdiff`` and ``python -m smartdiff``; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler = _logging(args.quiet)
    try:
        try:
            plan = plan_generate(args) if args.command == "generate" else plan_run(args)
            preflight(plan)
        except UsageError as error:
            message = str(error)
            if message.startswith("spec."):  # name the manifest, as ManifestError does
                message = f"{args.manifest}: {message}"
            _error(message)
            return EXIT_USAGE
        return execute(plan, progress=not args.no_progress, as_json=args.json)
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    finally:
        logging.getLogger("smartdiff").removeHandler(handler)
