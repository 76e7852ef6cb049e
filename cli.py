"""The ``gaze-edge`` command: a thin Click layer over the library (installed as gaze_edge.cli).

Every command calls one library function of the same name; whatever the CLI does, Python code can
do with one import. Exit codes: 0 success, 1 an error in the input (model, image, files), 2 bad
flags (Click's usage errors), 3 the patched runtime is missing. Errors print as one line; pass
``--verbose`` (before the command) for the traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path

import click

from gaze_edge.config import CONTEXT_TOKEN_MODES, SCORE_MODES, TRAINING_FREE

EXIT_INPUT = 1
EXIT_RUNTIME_MISSING = 3


def _known_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "the input is wrong", from the parts already imported."""
    errors: list[type[BaseException]] = [FileNotFoundError, IsADirectoryError, PermissionError]
    mods = sys.modules
    if "gaze_edge.convert.errors" in mods:
        errors.append(mods["gaze_edge.convert.errors"].ConvertError)
    if "gaze_edge.checkpoint" in mods:
        errors.append(mods["gaze_edge.checkpoint"].GazeCheckpointError)
    if "gaze_edge.errors" in mods:
        errors.append(mods["gaze_edge.errors"].GazeEdgeError)
    if "gaze_edge.runtime.model" in mods:
        errors.append(mods["gaze_edge.runtime.model"].ModelFilesError)
    return tuple(errors)


def handle_errors(func):
    """One clear line and a non-zero exit for known errors; the traceback only with --verbose."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        verbose = bool(ctx.find_root().params.get("verbose"))
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("gaze-edge: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - every error becomes one line
            if verbose:
                traceback.print_exc()
                if getattr(e, "detail", None):  # e.g. the converter child's own traceback
                    click.echo(e.detail, err=True)
            code = EXIT_INPUT
            if type(e).__name__ == "RuntimeMissing":
                code = EXIT_RUNTIME_MISSING
            elif not isinstance(e, _known_errors()) and not verbose:
                # An unexpected failure: still one line, but say it is ours.
                e = RuntimeError(f"internal error ({type(e).__name__}): {e}; rerun with --verbose")
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"gaze-edge: error: {message}", err=True)
            sys.exit(code)

    return wrapper


class OneLineErrors(click.Group):
    """Usage errors (a bad flag or value) as one line and exit 2, like every other error here."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("gaze-edge: aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = " ".join(e.format_message().split())
            click.echo(f"gaze-edge: error: {message}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gaze-edge")
@click.option("--verbose", is_flag=True, help="Show tracebacks and llama.cpp's log.")
def main(verbose: bool) -> None:
    """Gaze Attention for multimodal LLMs on a patched llama.cpp.

    Exit codes: 0 ok, 1 bad input (model, image, files), 2 bad flags, 3 patched runtime missing.
    """
    import warnings

    if not verbose:  # the library's warnings (e.g. a model without a chat template) as one line each
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"gaze-edge: warning: {message}",
                                                                           err=True)


# --------------------------------------------------------------------------- runtime


@main.group()
def runtime() -> None:
    """The patched llama.cpp runtime (llama-cpp-python built with patches/)."""


@runtime.command("build")
def runtime_build() -> None:
    """Build (once, cached) and install the patched llama-cpp-python into this environment.

    CMAKE_ARGS passes through, e.g. CMAKE_ARGS="-DGGML_CUDA=on" for NVIDIA GPUs.
    """
    from gaze_edge.runtime import build

    sys.exit(build.main(["install"]))


# --------------------------------------------------------------------------- chat / info


def _load_model(model_path: str | None, threads: int | None, verbose: bool, *, mmproj: str | None = None,
                n_ctx: int | None = None, gpu_layers: int = 0, image_min_tokens: int | None = None,
                image_max_tokens: int | None = None, gaze_asked: bool = False):
    """gaze_asked: the command asks for gaze (--keep-ratio, --keep-regions, --gaze-map): a plain
    GGUF pair then gazes with the training-free defaults (gaze_edge.config.TRAINING_FREE) without
    --gaze-region."""
    from gaze_edge.default_model import default_model_dir
    from gaze_edge.runtime.model import GazeModel

    if mmproj and not model_path:
        raise click.UsageError("--mmproj goes with -m/--model")
    meta = click.get_current_context().meta  # --gaze-region / --context-tokens (model_options)
    if "context_tokens" in meta and "gaze_region" not in meta:
        raise click.UsageError("--context-tokens goes with --gaze-region")
    return GazeModel.load(model_path or default_model_dir(), mmproj, n_threads=threads, verbose=verbose,
                          n_ctx=n_ctx, n_gpu_layers=gpu_layers, image_min_tokens=image_min_tokens,
                          image_max_tokens=image_max_tokens,
                          gaze_region=meta.get("gaze_region", "auto" if gaze_asked else None),
                          context_tokens=meta.get("context_tokens"))


def _remember(key: str, convert=None):
    """A click callback keeping an option's value in ctx.meta (for _load_model), not as an argument."""

    def callback(ctx, param, value):
        if value is not None:
            ctx.meta[key] = convert(value) if convert else value
        return value

    return callback


def _gaze_region_option(value: str) -> tuple[int, int]:
    try:
        return _parse_region(value)
    except click.BadParameter as e:
        raise click.BadParameter(f"--gaze-region: {e.message}") from None


def model_options(func):
    """-m/--model, --mmproj, -c/--ctx-size, -ngl/--gpu-layers, --image-min/max-tokens, --threads."""
    options = [
        click.option("-m", "--model", "model_path", type=click.Path(exists=True),
                     help="A language-model .gguf, or a folder holding one (from `gaze-edge convert`); "
                          "default: the embedded model."),
        click.option("--mmproj", type=click.Path(exists=True, dir_okay=False),
                     help="The vision projector .gguf (default: mmproj-<model file> beside the model, "
                          "else the only mmproj*.gguf there)."),
        click.option("-c", "--ctx-size", "ctx_size", type=click.IntRange(0),
                     help="Context size in tokens (cells); 0 = the model's training context "
                          "[default: the training context, at most 4096]."),
        click.option("-ngl", "--gpu-layers", "--n-gpu-layers", "gpu_layers", default=0, show_default=True,
                     type=click.IntRange(-1), help="Layers offloaded to the GPU; -1 = all."),
        click.option("--image-min-tokens", type=click.IntRange(1),
                     help="Fewest visual tokens per image (dynamic-resolution projectors, e.g. Qwen2-VL)."),
        click.option("--image-max-tokens", type=click.IntRange(1),
                     help="Most visual tokens per image (dynamic-resolution projectors, e.g. Qwen2-VL)."),
        click.option("-t", "--threads", type=click.IntRange(1), help="CPU threads (default: physical cores)."),
        click.option("--gaze-region", expose_value=False, callback=_remember("gaze_region", _gaze_region_option),
                     metavar="HxW", help="Gaze with a model not converted for it (e.g. a community GGUF pair): "
                                         "regions of HxW grid tokens and pooled context tokens [default with "
                                         f"--keep-ratio or --keep-regions: {TRAINING_FREE.region_h}x"
                                         f"{TRAINING_FREE.region_w}]."),
        click.option("--context-tokens", type=click.IntRange(0, 64), expose_value=False,
                     callback=_remember("context_tokens"),
                     help="With --gaze-region: context tokens pooled from each image "
                          f"[default: {TRAINING_FREE.n_context_tokens}]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_options(func):
    """llama.cpp's sampling flags: -n, --temp, --top-k, --top-p, --min-p, penalties, --seed, grammars."""
    options = [
        click.option("-n", "--n-predict", "--max-tokens", "max_tokens", default=128, show_default=True,
                     type=click.IntRange(1), help="Most tokens to generate."),
        click.option("--temp", "--temperature", "temperature", default=0.0, show_default=True,
                     type=click.FloatRange(0), help="0 = greedy."),
        click.option("--top-k", "top_k", default=40, show_default=True, type=click.IntRange(0),
                     help="Sampling top-k (0 = off). Not gaze: regions kept is --keep-regions."),
        click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--min-p", default=0.05, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--repeat-penalty", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
                     help="1 = off."),
        click.option("--repeat-last-n", default=64, show_default=True, type=click.IntRange(0)),
        click.option("--presence-penalty", default=0.0, show_default=True, type=float),
        click.option("--frequency-penalty", default=0.0, show_default=True, type=float),
        click.option("-s", "--seed", type=click.IntRange(0, 2**32 - 1),
                     help="Sampling seed (default: random; with --temp > 0)."),
        click.option("--stop", multiple=True, help="A string that ends the answer (not shown); repeatable."),
        click.option("--grammar-file", type=click.Path(exists=True, dir_okay=False),
                     help="Constrain the answer with a GBNF grammar file."),
        click.option("-j", "--json-schema", help="Constrain the answer to a JSON schema: JSON text or a .json file."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
              frequency_penalty, seed, stop, grammar_file, json_schema) -> dict:
    if grammar_file and json_schema:
        raise click.UsageError("--grammar-file and --json-schema cannot go together")
    grammar = Path(grammar_file).read_text() if grammar_file else None
    schema = None
    if json_schema:
        text = Path(json_schema).read_text() if json_schema.endswith(".json") and Path(json_schema).is_file() \
            else json_schema
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="--json-schema") from None
        if not isinstance(schema, dict | bool):
            raise click.BadParameter("a JSON schema is an object", param_hint="--json-schema")
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, seed=seed, stop=tuple(stop), grammar=grammar,
                json_schema=schema)


@main.command()
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="An image to ask about; repeatable.")
@click.option("--video", type=click.Path(dir_okay=False),
              help="A video to ask about (after the images): frames sampled uniformly, each an image with "
                   "its own label and regions, one gaze budget over all (needs the [video] extra); without "
                   "-m, the embedded video model answers.")
@click.option("--fps", type=click.FloatRange(0, min_open=True),
              help="With --video: frames to sample per second (default: --max-frames over the whole clip).")
@click.option("--max-frames", type=click.IntRange(1), default=8, show_default=True,
              help="With --video: at most this many frames.")
@click.option("-p", "--prompt", help="The question. Without it: an interactive chat on a terminal, "
              "else the prompt is read from standard input.")
@model_options
@sampling_options
@click.option("--dense", is_flag=True, help="Attend to every image token (gaze off).")
@click.option("--keep-regions", type=click.IntRange(1),
              help="Gaze: regions kept per step, over all images (overrides --keep-ratio).")
@click.option("--keep-ratio", type=click.FloatRange(0, 1, min_open=True),
              help="Gaze: fraction of all regions kept per step.")
@click.option("--gather", is_flag=True, help="Gather the kept K/V rows instead of masking the cache (same "
                                             "selection; faster on CPUs at small keep ratios with many images).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the answer with token counts, timings and the visual KV fraction as JSON.")
@click.option("--gaze-map", type=click.Path(dir_okay=False),
              help="Write where the model looked, per generated token: .png (grid) or .gif.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def chat(images, video, fps, max_frames, prompt, model_path, mmproj, ctx_size, gpu_layers, image_min_tokens,
         image_max_tokens, threads, dense, keep_regions, keep_ratio, gather, as_json, gaze_map, quiet,
         **sampling) -> None:
    """Ask a model about images or a video: one answer, or an interactive chat that keeps its context.

    In the interactive chat: /image PATH attaches an image to the next message, /clear starts over,
    /exit (or an empty line, or Ctrl-D) quits.
    """
    from gaze_edge.errors import GazeEdgeError
    from gaze_edge.images import load_image
    from gaze_edge.progress import prompt_progress

    if dense and (keep_regions or keep_ratio or gather):
        raise click.UsageError("--dense cannot go with --keep-regions, --keep-ratio or --gather")
    if gaze_map and dense:
        raise click.UsageError("--gaze-map needs gaze: drop --dense")
    if gaze_map and not images and not video:
        raise click.UsageError("--gaze-map needs an --image or a --video")
    if fps is not None and not video:
        raise click.UsageError("--fps needs a --video")
    if gaze_map and not gaze_map.lower().endswith((".png", ".gif")):
        raise click.UsageError("--gaze-map must end in .png or .gif")
    sampling = _sampling(**sampling)
    pictures = [load_image(p) for p in images]  # image errors before the model loads
    clip = None
    if video and prompt is None and sys.stdin.isatty() and not as_json:
        raise click.UsageError("--video needs a prompt (-p, or one piped on standard input): the interactive "
                               "chat takes images only")
    if video:
        from gaze_edge.video import load_video

        clip = load_video(video, fps=fps, max_frames=max_frames)  # video errors too
    verbose = bool(click.get_current_context().find_root().params.get("verbose"))
    if clip is not None and not model_path and not mmproj:  # (--mmproj alone stays _load_model's usage error)
        from gaze_edge.default_model import video_model_dir

        model_path = str(video_model_dir())  # the embedded model trained on clips
    model = _load_model(model_path, threads, verbose, mmproj=mmproj, n_ctx=ctx_size, gpu_layers=gpu_layers,
                        image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens,
                        gaze_asked=bool(keep_regions or keep_ratio or gaze_map))
    if gaze_map and model.gaze_defaults().region_h is None:
        raise GazeEdgeError("--gaze-map needs a gaze model (this one has no gaze regions)")
    options = dict(sampling, gaze=False if dense else None, keep_regions=keep_regions, keep_ratio=keep_ratio,
                   gather=gather, progress=prompt_progress(quiet))
    interactive = prompt is None and sys.stdin.isatty() and not as_json
    if prompt is None and not interactive:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise click.UsageError("no prompt: pass -p PROMPT or pipe one on standard input")
    if interactive:
        from gaze_edge.interactive import run_interactive

        def read() -> str:
            try:
                return click.prompt("you", default="", show_default=False, prompt_suffix="> ")
            except click.Abort:  # Ctrl-D / Ctrl-C at the prompt: the chat ends normally
                raise EOFError from None

        run_interactive(model, images=pictures, options=options, read=read,
                        write=lambda piece: click.echo(piece, nl=False),
                        warn=lambda line: click.echo(line, err=True))
        return
    result = model.chat(prompt, images=pictures, video=clip, trace=bool(gaze_map) or as_json, **options)
    if gaze_map and clip is not None:
        _write_video_gaze_map(result, clip, gaze_map)
    elif gaze_map:
        _write_gaze_map(result, pictures[0], gaze_map)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "model": str(model.files.model),
                               "gaze": model.gaze_defaults().region_h is not None and not dense,
                               "gaze_map": gaze_map,
                               **({"video_frames": clip.timestamps} if clip is not None else {})}, indent=2))
    else:
        click.echo(result.text.strip())


def _write_gaze_map(result, picture, path: str) -> None:
    from gaze_edge.errors import GazeEdgeError
    from gaze_edge.gazemap import RegionGrid, render

    image = next((im for im in result.images if im.region is not None), None)
    if image is None:
        raise GazeEdgeError("the image was not registered for gaze: no gaze map to draw")
    grid = RegionGrid(*image.grid, *image.region)
    # the first image's regions come first in the sequence's numbering; selection_frequency
    # ignores region ids beyond this grid (other images')
    steps = [(s.text, s.trace.selected) for s in result.steps if s.trace is not None]
    render(picture, grid, steps, path)


def _write_video_gaze_map(result, clip, path: str) -> None:
    from gaze_edge.errors import GazeEdgeError
    from gaze_edge.gazemap import RegionGrid, VideoFrame, render_video

    # the trace numbers the regions of every registered image in sequence order; the video's
    # frames are the last len(clip) images (the prompt puts images before the video)
    registered = sorted((im for im in result.images if im.id >= 0 and im.region is not None), key=lambda im: im.pos)
    first, firsts = 0, {}
    for im in registered:
        firsts[id(im)] = first
        first += im.n_regions
    held = result.images[-len(clip):]
    if len(held) != len(clip) or any(id(im) not in firsts for im in held):
        raise GazeEdgeError("the video's frames were not registered for gaze: no gaze map to draw")
    frames = [VideoFrame(picture, RegionGrid(*im.grid, *im.region), firsts[id(im)], label)
              for picture, im, label in zip(clip.frames, held, clip.labels(), strict=True)]
    steps = [(s.text, s.trace.selected) for s in result.steps if s.trace is not None]
    render_video(frames, steps, path)


@main.command()
@click.argument("model_dir", required=False, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def info(model_dir: str | None, as_json: bool) -> None:
    """Architecture, sizes, gaze settings and file checks of a model (default: the embedded one)."""
    from dataclasses import asdict

    model = _load_model(model_dir, None, False)
    defaults = model.gaze_defaults()
    files = {"model": str(model.files.model), "mmproj": str(model.files.mmproj) if model.files.mmproj else None}
    sizes = {k: (round(Path(v).stat().st_size / 2**20, 2) if v else None) for k, v in files.items()}
    data = {
        "files": files, "size_mib": sizes, "architecture": model.arch, "name": model.meta("general.name"),
        "n_layer": model.n_layer, "n_head": model.n_head, "n_head_kv": model.n_head_kv,
        "n_vocab": model.n_vocab, "vision": model.has_vision,
        "gaze": asdict(defaults) if defaults.region_h is not None else None,
        "chat_template": model.meta("tokenizer.chat_template") is not None,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:>14}: {value}")


# --------------------------------------------------------------------------- caption


@main.command("caption")
@click.argument("inputs", metavar="FILES_OR_DIR...", nargs=-1, required=True, type=click.Path())
@click.option("-p", "--prompt", default="Describe the image.", show_default=True, help="Asked of every image.")
@click.option("--jsonl", required=True, type=click.Path(dir_okay=False),
              help="Output: one JSON line per image, appended as each is done; rerunning resumes it.")
@model_options
@click.option("-r", "--recursive", is_flag=True, help="Also take the images in sub-folders.")
@click.option("-n", "--max-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temp", "temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--seed", type=int, help="Sampling seed (with --temp > 0).")
@click.option("--dense", is_flag=True, help="Attend to every image token (gaze off).")
@click.option("--keep-ratio", type=click.FloatRange(0, 1, min_open=True), help="Fraction of regions kept.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; no summary line unless an image failed.")
@click.option("--no-resume", is_flag=True, help="Start the output over instead of skipping images already in it.")
@handle_errors
def caption_command(inputs, prompt, jsonl, model_path, mmproj, ctx_size, gpu_layers, image_min_tokens,
                    image_max_tokens, threads, recursive, max_tokens, temperature, seed, dense, keep_ratio, quiet,
                    no_resume) -> None:
    """Caption many images with one loaded model, one JSON line each.

    FILES_OR_DIR: image files (always tried) and folders (their files with an image extension, sorted;
    other files such as .txt captions are left out). Each line holds the path and the text, token counts,
    timings and the visual KV fraction, or the path and an "error" for an image that could not be captioned.
    Rerunning skips the images already captioned and retries the failed ones; a line cut short by a
    crash is repaired.

    Exit status: 0 every image captioned, 1 some image failed (after trying all of them; the summary line
    on stderr says how many) or another input error, 2 bad flags.
    """
    from gaze_edge.caption import caption, find_images

    if dense and keep_ratio:
        raise click.UsageError("--dense cannot go with --keep-ratio")
    if mmproj and not model_path:
        raise click.UsageError("--mmproj goes with -m/--model")
    find_images(inputs, recursive=recursive)  # "no images found" before the model loads
    verbose = bool(click.get_current_context().find_root().params.get("verbose"))
    model = _load_model(model_path, threads, verbose, mmproj=mmproj, n_ctx=ctx_size, gpu_layers=gpu_layers,
                        image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens,
                        gaze_asked=bool(keep_ratio))
    summary = caption(model, inputs, jsonl=jsonl, prompt=prompt, resume=not no_resume, recursive=recursive,
                      progress=False if quiet else None, max_tokens=max_tokens, temperature=temperature,
                      seed=seed, gaze=False if dense else None, keep_ratio=keep_ratio)
    if summary.failed or not quiet:
        click.echo(f"gaze-edge caption: {summary}", err=True)
    if summary.failed:
        sys.exit(EXIT_INPUT)


# --------------------------------------------------------------------------- serve


@main.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; set an --api-key then).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", envvar="GAZE_EDGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health [env GAZE_EDGE_API_KEY].")
@click.option("--alias", "model_name",
              help="The model's name in /v1/models and /api/tags (default: the GGUF file's name).")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Request bodies larger than this get 413.")
@click.option("--allow-file-urls", is_flag=True, help="Follow file:// image URLs (they read this machine's files).")
@click.option("--allow-http-urls", is_flag=True, help="Fetch http(s):// image URLs (at most 10 s and 20 MiB each).")
@click.option("--cached-conversations", default=4, show_default=True, type=click.IntRange(0),
              help="Warm conversations kept across requests (each one llama.cpp context); 0 = every request cold.")
@click.option("--cache-ram", "cache_ram_mb", type=click.FloatRange(0),
              help="MiB of KV cache the warm conversations may hold together (default: no limit but their count).")
@handle_errors
def serve_command(model_path, mmproj, ctx_size, gpu_layers, image_min_tokens, image_max_tokens, threads, host, port,
                  api_key, model_name, max_body_mb, allow_file_urls, allow_http_urls, cached_conversations,
                  cache_ram_mb) -> None:
    """Serve the model over HTTP for desktop assistants: OpenAI's /v1/chat/completions and Ollama's
    /api/chat (docs/SERVER.md). Needs `pip install gaze-edge[server]`."""
    from gaze_edge import server

    missing = server.missing_packages()
    if missing:
        click.echo(f"gaze-edge: error: {server.INSTALL_HINT} (missing: {', '.join(missing)})", err=True)
        sys.exit(EXIT_INPUT)
    verbose = bool(click.get_current_context().find_root().params.get("verbose"))
    model = _load_model(model_path, threads, verbose, mmproj=mmproj, n_ctx=ctx_size, gpu_layers=gpu_layers,
                        image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens)
    model.conversations.max_conversations = cached_conversations
    if cache_ram_mb is not None:
        model.conversations.max_bytes = int(cache_ram_mb * 2**20)
    name = model_name or model.files.model.stem
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"gaze-edge serve: {name} at http://{shown}:{port}/v1 (OpenAI) and http://{shown}:{port}/api "
               "(Ollama); Ctrl-C stops", err=True)
    server.serve(model, host=host, port=port, model_name=name, api_key=api_key,
                 max_body_bytes=int(max_body_mb * 2**20), allow_file_urls=allow_file_urls,
                 allow_http_urls=allow_http_urls, log_level="debug" if verbose else "info")


# --------------------------------------------------------------------------- convert


@main.command()
@click.argument("src")
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for <name>-<outtype>.gguf and mmproj-<name>-<outtype>.gguf.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0", "q4_k_m"]), default="f16",
              show_default=True, help="Weight type of the language model.")
@click.option("--name", help="Base name of the output files (default: from SRC).")
@handle_errors
def convert(src: str, outdir: str, outtype: str, name: str | None) -> None:
    """Convert an HF checkpoint (local folder or hub repo id; dense or gaze) to a GGUF pair.

    Supported: LLaVA-1.5 style (CLIP + MLP projector + Llama/Qwen2) and Qwen2-VL / Qwen2.5-VL.
    """
    from gaze_edge.convert import convert as convert_model

    llm, mmproj = convert_model(src, outdir, outtype=outtype, name=name)
    click.echo(llm)
    click.echo(mmproj)


class _ContextTokens(click.ParamType):
    """``learned`` or ``pooled``; a number is the older spelling of ``--n-context-tokens N`` (learned)."""

    name = "learned|pooled"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).isdigit():
            if not 0 <= int(value) <= 64:
                self.fail(f"{value} context tokens: expected 0 to 64", param, ctx)
            return int(value)
        if value in CONTEXT_TOKEN_MODES:
            return value
        self.fail(f"expected learned or pooled, got {value!r}", param, ctx)


@main.command("make-gaze")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--region", default=f"{TRAINING_FREE.region_h}x{TRAINING_FREE.region_w}", show_default=True,
              help="Region size HxW in grid tokens.")
@click.option("--context-tokens", "context_mode", default=TRAINING_FREE.context_tokens, show_default=True,
              type=_ContextTokens(),
              help="pooled: computed from each image's own embeddings at run time (nothing saved); learned: a "
                   "tensor saved with the model, initialised from the mean image embedding (to distil or "
                   "fine-tune).")
@click.option("--n-context-tokens", default=TRAINING_FREE.n_context_tokens, show_default=True,
              type=click.IntRange(0, 64), help="Context tokens after every image.")
@click.option("--keep-ratio", default=TRAINING_FREE.keep_ratio, show_default=True,
              type=click.FloatRange(0, 1, min_open=True))
@click.option("--keep-regions", "top_k", default=0, show_default=True, type=click.IntRange(0),
              help="Regions kept per step (the checkpoint's gaze top_k); > 0 overrides --keep-ratio.")
@click.option("--score-mode", default=TRAINING_FREE.score_mode, show_default=True, type=click.Choice(SCORE_MODES),
              help="How regions are scored (docs/GAZE_SPEC.md): gqa_max keeps a region one query head wants.")
@click.option("--dense-layers", "n_dense_layers", default=TRAINING_FREE.n_dense_layers, show_default=True,
              type=click.IntRange(0), help="The first N text layers attend to every image token at gaze steps.")
@handle_errors
def make_gaze(src: str, dst: str, region: str, context_mode: str | int, n_context_tokens: int,
              keep_ratio: float, top_k: int, score_mode: str, n_dense_layers: int) -> None:
    """Turn a dense HF checkpoint into a gaze checkpoint ("training-free" gaze).

    The defaults are the measured training-free ones (docs/TRAINING.md): one context token pooled
    from each image (no tensor), gqa_max scoring. Learned context tokens start as the mean image
    embedding (fine-tune or `gaze-edge distill` them for best results).
    """
    from gaze_edge.checkpoint import dense_to_gaze
    from gaze_edge.config import GazeConfig

    if isinstance(context_mode, int):  # --context-tokens N: the count, as before
        given = click.get_current_context().get_parameter_source("n_context_tokens")
        if given != click.core.ParameterSource.DEFAULT and n_context_tokens != context_mode:
            raise click.UsageError("--context-tokens N and --n-context-tokens disagree: give the count once")
        context_mode, n_context_tokens = "learned", context_mode
    rh, rw = _parse_region(region)
    cfg = GazeConfig(region_h=rh, region_w=rw, n_context_tokens=n_context_tokens, top_k=top_k,
                     keep_ratio=keep_ratio, score_mode=score_mode, n_dense_layers=n_dense_layers,
                     context_tokens=context_mode)
    dense_to_gaze(src, dst, cfg)
    click.echo(dst)


def _parse_region(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected HxW with positive integers, got {text!r}",
                                 param_hint="--region") from None
    return h, w


@main.command("distill")
@click.argument("src")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output gaze checkpoint folder (its run state in OUT/.distill; rerunning continues it).")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="A folder of your own images to distil on (every image with every prompt).")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="With --images: a text file, one prompt per line [default: describe / ask prompts].")
@click.option("--scenes", type=click.IntRange(2), help="Instead of --images: this many GazeScenes scenes.")
@click.option("--max-samples", type=click.IntRange(2), help="At most this many (image, prompt) pairs.")
@click.option("--keep-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="The gaze budget to learn (the output's default).")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-2, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Peak learning rate of the context tokens.")
@click.option("--lora-rank", default=0, show_default=True, type=click.IntRange(0),
              help="Also train a LoRA adapter of this rank on the text attention projections (merged into "
                   "the saved weights); 0 = context tokens only.")
@click.option("--lora-lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Peak learning rate of the LoRA adapter.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--answer-tokens", default=64, show_default=True, type=click.IntRange(1),
              help="Longest answer the dense model writes for each prompt.")
@click.option("--region", help=f"Dense SRC: region size HxW in grid tokens [default: {TRAINING_FREE.region_h}x"
                               f"{TRAINING_FREE.region_w}].")
@click.option("--n-context-tokens", type=click.IntRange(1, 64),
              help="Dense SRC: learned context tokens after every image [default: 1].")
@click.option("--score-mode", type=click.Choice(SCORE_MODES),
              help=f"How regions are scored [default: SRC's, or {TRAINING_FREE.score_mode}].")
@click.option("--dense-layers", "n_dense_layers", type=click.IntRange(0),
              help="The first N text layers attend to every image token at gaze steps "
                   f"[default: SRC's, or {TRAINING_FREE.n_dense_layers}].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when present]")
@click.option("--bf16/--f32", "bf16", default=None,
              help="bf16 autocast for the training steps [default: on] (measurements are float32).")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads.")
@click.option("--seed", default=0, show_default=True, type=int, help="Order of the samples, LoRA init.")
@click.option("--fresh", is_flag=True, help="Start the run in OUT over (the teacher's answers are kept).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def distill_command(src, out, images, prompts, scenes, max_samples, keep_ratio, steps, lr, lora_rank, lora_lr,
                    batch_size, answer_tokens, region, n_context_tokens, score_mode, n_dense_layers, device, bf16,
                    threads, seed, fresh, quiet) -> None:
    """Teach a checkpoint to gaze at a budget, with its dense self as the teacher (no labels).

    SRC: a dense (LLaVA-1.5 / Qwen2-VL) or gaze checkpoint folder. The dense model answers the
    prompts about the images; only the context tokens (and a LoRA adapter with --lora-rank) learn
    to give the same next-token distributions while gazing at --keep-ratio. Prints the held-out
    divergence before and after; OUT converts with `gaze-edge convert`.
    """
    from gaze_edge.train.distill import distill

    if (images is None) == (scenes is None):
        raise click.UsageError("give --images DIR or --scenes N")
    if prompts and not images:
        raise click.UsageError("--prompts goes with --images")
    result = distill(src, out, images=images, prompts=prompts, scenes=scenes, max_samples=max_samples,
                     keep_ratio=keep_ratio, steps=steps, lr=lr, lora_rank=lora_rank, lora_lr=lora_lr,
                     batch_size=batch_size, answer_tokens=answer_tokens,
                     region=_parse_region(region) if region else None, context_tokens=n_context_tokens,
                     score_mode=score_mode, n_dense_layers=n_dense_layers, seed=seed, device=device, bf16=bf16,
                     threads=threads, fresh=fresh, progress=False if quiet else None)
    before, after = result.before, result.after
    click.echo(f"held-out divergence at keep {keep_ratio:g} (KL, nats per answer token, {before['tokens']} tokens): "
               f"{before['kl']:.4g} before -> {after['kl']:.4g} after; top-1 agreement "
               f"{100 * before['top1_agreement']:.1f}% -> {100 * after['top1_agreement']:.1f}%")
    click.echo(result.folder)


# --------------------------------------------------------------------------- train / eval


@main.command()
@click.option("--preset", default="default", show_default=True, help="smoke, default or dense.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (model in OUT/model).")
@click.option("--steps", type=click.IntRange(1), help="Override the preset's step count.")
@click.option("--seed", type=int, help="Override the preset's seed.")
@click.option("--device", help="cpu or cuda (default: cuda when available).")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads.")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming an unfinished run.")
@handle_errors
def train(preset: str, out: str, steps: int | None, seed: int | None, device: str | None,
          threads: int | None, fresh: bool) -> None:
    """Train a tiny VLM on GazeScenes (dense or with gaze), resumable, with a progress bar."""
    from gaze_edge.train import preset as make_preset
    from gaze_edge.train import train as run_training

    changes = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    folder = run_training(make_preset(preset, **changes), out, resume=not fresh, device=device,
                          threads=threads)
    click.echo(f"model saved in {folder}")


def _is_gguf_model(path: str | None) -> bool:
    if path is None:
        return True
    p = Path(path)
    return p.suffix == ".gguf" or (p.is_dir() and any(p.glob("*.gguf")))


@main.command("eval")
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--keep-ratio", "keep_ratios", multiple=True, default=("dense", "0.25"), show_default=True,
              help="'dense' or a ratio; repeatable.")
@click.option("--scenes", default=500, show_default=True, type=click.IntRange(1))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--reference", type=click.Path(exists=True, file_okay=False),
              help="With a GGUF model: also decode the same scenes with this transformers checkpoint "
                   "(the PyTorch reference) and compare.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for the runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows.")
@handle_errors
def evaluate(path: str | None, keep_ratios: tuple[str, ...], scenes: int, split: str, reference: str | None,
             threads: int | None, as_json: bool) -> None:
    """Object-level accuracy on GazeScenes.

    PATH: a GGUF model (folder or file; default: the embedded model), decoded by the runtime, or a
    transformers checkpoint / training run, decoded by the PyTorch reference.
    """
    ratios = []
    for text in keep_ratios:
        try:
            ratios.append(None if text == "dense" else float(text))
        except ValueError:
            raise click.BadParameter(f"{text!r} is neither 'dense' nor a number", param_hint="--keep-ratio") from None
        if ratios[-1] is not None and not 0 < ratios[-1] <= 1:
            raise click.BadParameter(f"{text} is not in (0, 1]", param_hint="--keep-ratio")
    if not _is_gguf_model(path):
        if reference:
            raise click.BadParameter("--reference compares a GGUF model with its checkpoint; PATH is already "
                                     "a checkpoint", param_hint="--reference")
        from gaze_edge.train import evaluate as run_eval

        rows = []
        for ratio in ratios:
            result = run_eval(path, keep_ratio=ratio, n_scenes=scenes, split=split)
            rows.append({"keep_ratio": ratio, "object_accuracy": result.object_accuracy})
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            for r in rows:
                mode = "dense" if r["keep_ratio"] is None else f"gaze {r['keep_ratio']:g}"
                click.echo(f"{mode:>10}  object accuracy {100 * r['object_accuracy']:.1f}% (reference)")
        return

    from gaze_edge.bench import quality

    model = _load_model(path, threads, False)

    def progress(label: str, done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            click.echo(f"\r{label}: {done}/{total} scenes", err=True, nl=done == total)

    rows = quality.run(model, ratios, n_scenes=scenes, split=split, reference=reference, progress=progress)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        click.echo(quality.format_table(rows, scenes))


# --------------------------------------------------------------------------- bench


def _parse_counts(text: str, flag: str = "--visual") -> list[int]:
    counts = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            n = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a count (e.g. 4096 or 4k)", param_hint=flag) from None
        if n < 1:
            raise click.BadParameter(f"{part!r} must be >= 1", param_hint=flag)
        counts.append(n)
    return counts


@main.command()
@click.argument("model_dir", required=False, type=click.Path(exists=True))
@click.option("--shape", help="Benchmark a random-weight model of this shape instead, made and converted with "
                              "our converter on first use (needs the [convert] extra): qwen2-0.5b.")
@click.option("--visual", default="1k,4k,16k", show_default=True,
              help="Visual-token counts, comma-separated (k = 1024), filled with whole images.")
@click.option("--frames", help="Instead of --visual: image counts, comma-separated (e.g. 8,32,128): video frames, "
                               "each its own grid and context tokens under one gaze budget.")
@click.option("--keep-ratio", "keep_ratios", multiple=True, type=click.FloatRange(0, 1, min_open=True),
              default=(0.1, 0.25, 0.5), show_default=True, help="Gaze keep ratios to time; repeatable.")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1),
              help="Rounds over the modes (each: an untimed step, then --steps timed steps per mode).")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(1), help="Timed steps per mode and round.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: physical cores).")
@click.option("--kv-type", default="f16", show_default=True, type=click.Choice(["f16", "q8_0"]))
@click.option("--restrict", default="mask", show_default=True, type=click.Choice(["mask", "gather", "both"]),
              help="How gaze restricts attention: a mask over the cache, gathering the selected K/V rows, "
                   "or both (every keep ratio timed each way).")
@click.option("--profile", is_flag=True, help="Also time every graph node: where a step spends its time "
                                              "(attention, gaze selection, weights); slows every step.")
@click.option("--warm", is_flag=True, help="Instead: turn 2 of a conversation warm vs cold (prompt time, "
                                           "tokens reused, same answer).")
@click.option("--images", default=1, show_default=True, type=click.IntRange(1),
              help="With --warm: GazeScenes images in turn 1.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(1),
              help="With --warm: tokens per answer.")
@click.option("--dense", is_flag=True, help="With --warm: answer densely (the turn-1 answer is reused too).")
@click.option("--score-mode", type=click.Choice(SCORE_MODES), help="The gaze rows' score mode (default: the model's).")
@click.option("--dense-layers", "n_dense_layers", type=click.IntRange(0),
              help="The gaze rows attend densely in the first N layers (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def bench(model_dir, shape, visual, frames, keep_ratios, rounds, steps, threads, kv_type, restrict, profile, warm, images,
          max_tokens, dense, score_mode, n_dense_layers, as_json) -> None:
    """Decode speed, dense vs gaze, side by side on one cache (default: the embedded model).

    Prefills text and images once per visual-token count, then times dense and gaze steps on that
    same cache, alternating modes; prints ms/token, ratios, the visual KV used, the bandwidth bound
    of each mode and the peak RSS. Numbers depend on the machine: compare the ratios.

    With --warm: the prompt time of a conversation's second turn, answered by the warm
    conversation and cold, alternating over --rounds.
    """
    if frames and click.get_current_context().get_parameter_source("visual") != click.core.ParameterSource.DEFAULT:
        raise click.BadParameter("give --visual or --frames, not both", param_hint="--frames")
    counts = _parse_counts(frames, "--frames") if frames else _parse_counts(visual)
    if frames and warm:
        raise click.BadParameter("--frames times decoding; --warm times turn 2", param_hint="--frames")
    if shape and model_dir:
        raise click.BadParameter("give a model folder or --shape, not both", param_hint="--shape")
    if warm:
        from gaze_edge.bench import warm as warm_bench

        report = warm_bench.bench_warm(model_dir, shape, images=images, rounds=rounds, threads=threads,
                                       max_tokens=max_tokens, n_ctx=None, dense=dense,
                                       progress=lambda line: click.echo(line, err=True))
        click.echo(json.dumps(report.to_json(), indent=2) if as_json else warm_bench.format_table(report))
        return
    from gaze_edge.bench import shapes, speed

    if shape:
        if shape not in shapes.SHAPES:
            raise click.BadParameter(f"unknown shape {shape!r}; known: {', '.join(sorted(shapes.SHAPES))}",
                                     param_hint="--shape")
        model_dir = str(shapes.ensure(shape))
    model = _load_model(model_dir, threads, False)
    report = speed.run(model, counts, list(keep_ratios), rounds=rounds, per_round=steps, kv_type=kv_type,
                       restrict=restrict, profile=profile, score_mode=score_mode, n_dense_layers=n_dense_layers,
                       frames=bool(frames), progress=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else speed.format_table(report))


if __name__ == "__main__":
    main()
