"""`from_pretrained` / `save_pretrained`: Hugging Face GPT-2 folders and hub ids in, Hugging Face folders out.

    model, params = flax_gpt2.from_pretrained("gpt2")            # hub id, or a local folder
    logits = model.apply({"params": params}, input_ids).logits   # [B, T, V]
    flax_gpt2.save_pretrained("out/gpt2-copy", model, params)    # transformers can load this folder
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
import weakref
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flax_gpt2.checkpoints import formats as files, peft_adapters, remote, run_folders
from flax_gpt2.checkpoints.hf_state_dict import (check_params, hf_state_dict_from_params, infer_model_class,
                                                 params_from_hf_state_dict, tensor_count)
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.config import RUNTIME_FIELDS, GPT2Config
from flax_gpt2.modeling.lora import merge_adapter
from flax_gpt2.modeling.model import GPT2DoubleHeadsModel, GPT2LMHeadModel, GPT2Model, unwrap_params
from flax_gpt2.modeling.quantize import check_not_quantized, check_quantize, quantize_params
from flax_gpt2.tokenizer import bpe_files
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer
from flax_gpt2.utils import file_io, hub

MODEL_CLASSES = {cls.__name__: cls for cls in (GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel)}
# What `**config_overrides` may change: how the model runs (the dtypes have keywords of their own).
_OVERRIDABLE = RUNTIME_FIELDS - {"dtype", "param_dtype"}
# Non-weight files worth fetching from the hub: the config, generation defaults, the tokenizer.
_HUB_EXTRA_FILES = ("config.json", "generation_config.json", *(name for pair in bpe_files.FILE_PAIRS for name in pair),
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SHARD = {files.SAFETENSORS_INDEX: r"model-\d+-of-\d+\.safetensors",
          files.TORCH_BIN_INDEX: r"pytorch_model-\d+-of-\d+\.bin"}
# id(model) -> the local folder `from_pretrained` read it from, while that model object lives.
_LOADED_FROM: dict[int, str] = {}
# The weight formats `save_pretrained` writes: the Hugging Face folder in safetensors (what transformers
# writes today), or transformers' old Flax layout `flax_model.msgpack` (transformers <= 4.x Flax models).
SAVE_FORMATS = ("safetensors", "msgpack")


def from_pretrained(name_or_path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                    model_class: type | str = GPT2LMHeadModel, revision: str | None = None, progress: bool = True,
                    seed: int = 0, pass_folder_as: str = "from_pretrained('DIR')",
                    adapter: str | os.PathLike | None = None, quantize: str | None = None,
                    **config_overrides) -> tuple[Any, dict[str, Any]]:
    """Loads a GPT-2 model and its parameters.

    Args:
      name_or_path: a local folder (a Hugging Face model folder, a folder written by `save_pretrained`
        or `python -m flax_gpt2.convert`, or a flax_gpt2 training run), or a hub id such as "gpt2" or
        "openai-community/gpt2-medium". Weights are read from `model.safetensors` (also sharded),
        `pytorch_model.bin` (read without torch and without running pickled code) or
        `flax_model.msgpack`, preferring safetensors.
      dtype: compute dtype (e.g. `jnp.bfloat16`); default float32.
      param_dtype: dtype the parameters are stored in; default float32 (fp16/bf16 checkpoints are cast).
      model_class: GPT2Model, GPT2LMHeadModel or GPT2DoubleHeadsModel. A multiple-choice head missing
        from the checkpoint is initialized randomly (from `seed`) with a warning, as transformers does.
      revision: hub branch, tag or commit.
      progress: show progress bars.
      seed: seeds a missing multiple-choice head.
      pass_folder_as: how the error for an unreachable hub tells the user to pass a downloaded folder
        instead (a command line names its flag, e.g. `"--config.init_from=DIR"`).
      adapter: a PEFT LoRA adapter folder for this base (`adapter_config.json` + `adapter_model.safetensors`,
        as `peft`'s `save_pretrained` or `flax_gpt2.save_peft_adapter` write it). It is checked against the
        weights as read (shapes, and the base-weights hash when the folder records one) and merged into
        the kernels (`merge_adapter`) after the cast to `param_dtype`, so the returned model is the base's
        class and shape and everything downstream (generate, pipeline, evaluation, save_pretrained) uses
        it unchanged. A folder that is unreadable or made for another base raises
        `flax_gpt2.checkpoints.peft_adapters.AdapterError` (a ValueError naming the folder).
      quantize: None (float weights) or "int8": int8 weight-only quantization for inference
        (`flax_gpt2.modeling.quantize`): the block matrices and `wte` (the tied LM head) become int8 with one
        float32 scale per output channel, after the cast to `param_dtype` and after merging `adapter`. The
        model class and API are the same; the params take about 0.26x the bytes of float32.
      **config_overrides: how the model runs, as `GPT2Config` fields: `scan_layers=True` (params come
        stacked on a leading layers axis), `attention="dot_product"`, `remat=True`. Fields that change
        the weights' shapes cannot be overridden.

    Returns:
      `(model, params)`: call `model.apply({"params": params}, input_ids, attention_mask=mask)`.
    """
    if isinstance(model_class, str) and model_class in MODEL_CLASSES:
        model_class = MODEL_CLASSES[model_class]
    if model_class not in MODEL_CLASSES.values():
        raise ValueError(f"model_class must be one of {sorted(MODEL_CLASSES)}, got {model_class!r}")
    not_runtime = sorted(set(config_overrides) - _OVERRIDABLE)
    if not_runtime:
        raise TypeError(f"from_pretrained cannot override {', '.join(not_runtime)}: only how the model runs "
                        f"({', '.join(sorted(_OVERRIDABLE))}) can change; the checkpoint fixes the rest")
    check_quantize(quantize)
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    overrides.update(config_overrides)
    folder = resolve(name_or_path, revision=revision, progress=progress, pass_folder_as=pass_folder_as)

    has_config = os.path.isfile(os.path.join(folder, "config.json"))
    if has_config and run_folders.is_run_folder(folder):
        # Older versions let `convert --out RUN` write an export here; loading it would silently ignore the
        # run's newer checkpoints, loading the checkpoints would ignore the export. Neither is guessed.
        raise ValueError(f"{folder} holds both a training run (checkpoints/, train_config.json) and a Hugging Face "
                         "export (config.json and weights): which to load is ambiguous. Move the export's files "
                         "(config.json, generation_config.json, the weights) into a folder of their own, or pass "
                         "that folder instead")
    if not has_config:
        run = _load_training_run(folder)
        if run is None:
            raise FileNotFoundError(f"{folder} has no config.json: it is neither a Hugging Face GPT-2 folder "
                                    "nor a flax_gpt2 training run")
        config, params = run
        config = config.replace(**overrides)
        check_params(params, config, infer_model_class(params))
        params = _adapt(params, config, infer_model_class(params), model_class, seed)
    else:
        config = GPT2Config.from_hf_config(folder, **overrides)
        # The file may list what the model needs, any causal-mask buffers and heads, not arbitrarily more.
        max_tensors = min(files.MAX_TENSORS, 2 * tensor_count(config, GPT2DoubleHeadsModel) + 64)
        tensors = files.read_weights(files.find_weights(folder), progress=progress, max_tensors=max_tensors)
        params = params_from_hf_state_dict(tensors, config, model_class, seed=seed)
    params = layer_stacking.to_layout(params, config.scan_layers)
    # Checked on the weights as stored: the base hash rounds them to bfloat16, which a float16 cast first would change.
    adapted = peft_adapters.adapter_for_base(adapter, params, config) if adapter is not None else None
    model = model_class(config)
    _LOADED_FROM[id(model)] = folder  # save_pretrained(model, tokenizer=True) copies this folder's tokenizer
    weakref.finalize(model, _LOADED_FROM.pop, id(model), None)
    params = _to_device(params, config.param_dtype, progress)
    if adapted is not None:
        params = merge_adapter(params, *adapted)
    return model, params if quantize is None else quantize_params(params)


def save_pretrained(path: str | os.PathLike, model, params: dict[str, Any], tokenizer: Any = True, *,
                    overwrite: bool = False, dtype: Any = jnp.float32, max_shard_size: int | str = "50GB",
                    format: str = "safetensors", progress: bool = True) -> str:
    """Writes a Hugging Face GPT-2 folder that `transformers.AutoModel*.from_pretrained` and
    `flax_gpt2.from_pretrained` both load.

    Writes `config.json`, `model.safetensors` (HF key names; shards plus `model.safetensors.index.json`
    past `max_shard_size`; a tied `lm_head` is not written, as transformers does),
    `generation_config.json`, and the tokenizer's `vocab.json` + `merges.txt`. With `format="msgpack"`
    the weights are `flax_model.msgpack` instead, as transformers' `FlaxGPT2LMHeadModel` (<= 4.x) saved
    them; that layout has no double-heads model.

    Args:
      path: the output folder. If it exists and holds anything, `overwrite=True` is required; then only
        the files written here (and stale weight shards that would shadow them) are replaced.
      model: the flax_gpt2 model (its class sets `architectures` and the key prefix).
      params: its parameters (`{"params": ...}` is accepted too).
      tokenizer: True for the model's own (the tokenizer files of the folder `from_pretrained` loaded this
        model object from, copied without asking the hub; else the standard GPT-2 tokenizer), a folder to
        take it from (`vocab.json` + `merges.txt` or `encoder.json` + `vocab.bpe`, see
        `flax_gpt2.tokenizer.bpe_tokenizer.tokenizer_files`; written as `vocab.json` + `merges.txt`), a `Tokenizer`, or
        False/None to write none.
      dtype: dtype of the saved floating-point tensors (float32 unless asked; bf16 params are upcast).
      max_shard_size: e.g. "5GB"; larger models are sharded (safetensors only: msgpack is one file).
      format: "safetensors" or "msgpack" (see `SAVE_FORMATS`).
      progress: show progress bars.

    Returns:
      The folder's path.
    """
    model_class = type(model)
    if model_class not in MODEL_CLASSES.values():
        raise ValueError(f"model must be a GPT2Model, GPT2LMHeadModel or GPT2DoubleHeadsModel, got {model_class}")
    check_save_format(format, model_class)
    params = unwrap_params(params)
    check_not_quantized(params, "save_pretrained")
    folder = os.fspath(path)
    check_output_folder(folder, overwrite)
    config: GPT2Config = model.config
    state = hf_state_dict_from_params(params, config, model_class)
    dtype = np.dtype(dtype)
    state = {k: v.astype(dtype, copy=False) if jnp.issubdtype(v.dtype, jnp.floating) else v
             for k, v in state.items()}

    hf_config = config.to_hf_config(architectures=(model_class.__name__,))
    hf_config["dtype"] = dtype.name
    created = not os.path.exists(folder)
    try:
        # Every new file is complete (and fsynced) before any old one is replaced: a full disk or a crash
        # leaves the previous save, never a folder without its weights.
        with file_io.staged_folder(folder) as staging:
            if format == "msgpack":
                written = files.write_flax_msgpack(staging, state, progress=progress)
            else:
                written = files.write_safetensors(staging, state, metadata={"format": "pt"},
                                                  max_shard_size=max_shard_size, progress=progress)
            _write_json(os.path.join(staging, "config.json"), hf_config)
            _write_json(os.path.join(staging, "generation_config.json"),
                        {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                         "eos_token_id": config.eos_token_id})
            _save_tokenizer(staging, tokenizer, model)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if the failed save left it empty
        raise
    _remove_stale_weights(folder, keep=written, format=format)
    return folder


def check_save_format(format: str, model_class: type) -> None:
    """ValueError unless `save_pretrained` can write `model_class` in `format` (checked before any work)."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SAVE_FORMATS)}, got {format!r}")
    if format == "msgpack" and model_class is GPT2DoubleHeadsModel:
        raise ValueError("format='msgpack' cannot hold a GPT2DoubleHeadsModel: transformers' Flax GPT-2 had no "
                         "double-heads model; save it as safetensors")


# --- resolution: local folder or hub id ----------------------------------------------------------------

def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, progress: bool = True,
            pass_folder_as: str = "from_pretrained('DIR')") -> str:
    """A local folder for `name_or_path`: the folder itself (as an absolute path), or a hub snapshot holding
    only one weights format.

    Local paths are made absolute (orbax refuses relative checkpoint paths, and a later `chdir` must not
    move the run). URLs (`gs://...`) are never taken for hub ids or local folders. `pass_folder_as` is how
    the error for an unreachable hub tells the user to pass a downloaded folder (`"--model DIR"` on a
    command line).
    """
    if file_io.is_url(name_or_path):
        return _resolve_url(os.fspath(name_or_path))
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ValueError("the model name or path is empty: pass a hub id such as 'gpt2' or a model folder")
    path = file_io.resolve_path(text)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{text} is a file; pass the folder that holds it and its config.json")
    # Hub ids are "name" or "org/name"; anything else can only have been meant as a local path.
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or os.path.isabs(text):
        raise FileNotFoundError(f"no such folder: {path}")
    return _download(text, revision, progress, pass_folder_as)


def _resolve_url(url: str) -> str:
    """Remote storage (gs://...): a local mirror folder (`flax_gpt2.checkpoints.remote`); never a hub id."""
    return remote.local_folder(url)


def _download(repo_id: str, revision: str | None, progress: bool, pass_folder_as: str) -> str:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    unreachable = hub.hub_unreachable()  # one short probe, not huggingface_hub's ~40 s of retries
    with _hub_progress(progress):
        try:
            if unreachable:
                raise ConnectionError(unreachable)
            listing = set(list_repo_files(repo_id, revision=revision))
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            raise OSError(f"{repo_id!r} is not a local folder, and the Hugging Face hub says: {e}") from e
        except Exception as e:  # offline mode, no network, timeouts: fall back to the hub cache
            try:
                return snapshot_download(repo_id, revision=revision, local_files_only=True)
            except Exception:
                raise OSError(
                    f"{repo_id!r} is not a local folder, the Hugging Face hub cannot be reached "
                    f"({type(e).__name__}: {e}), and the hub cache holds no copy. On a machine with network, "
                    f"run `hf download {repo_id} --local-dir DIR` (or `git clone "
                    f"https://huggingface.co/{repo_id}`), then pass that folder: {pass_folder_as}.") from e
        weights = next((name for name in files.WEIGHT_FILES if name in listing), None)
        if weights is None:
            raise FileNotFoundError(f"hub repo {repo_id!r} has no GPT-2 weights ({', '.join(files.WEIGHT_FILES)})")
        wanted = [name for name in _HUB_EXTRA_FILES if name in listing] + [weights]
        if weights in _SHARD:
            wanted += sorted(name for name in listing if re.fullmatch(_SHARD[weights], name))
        return snapshot_download(repo_id, revision=revision, allow_patterns=wanted)


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _load_training_run(folder: str):
    """`(config, params)` when `folder` is a flax_gpt2 training run, else None."""
    folder = remote.run_url(folder) or folder  # a mirror of a run on remote storage
    if not run_folders.is_training_run(folder):
        return None
    return run_folders.load_run(folder)


# --- helpers -------------------------------------------------------------------------------------------

def _adapt(params, config: GPT2Config, from_class: type, to_class: type, seed: int):
    """Params of `from_class` re-keyed for `to_class` (heads dropped or added as the rename table says)."""
    if from_class is to_class:
        return params
    return params_from_hf_state_dict(hf_state_dict_from_params(params, config, from_class), config, to_class,
                                     seed=seed)


def _to_device(params, param_dtype, progress: bool):
    """Casts floating-point arrays to `param_dtype` and moves every array to the default device."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for x in tqdm(leaves, desc="Converting", unit="tensor", disable=not progress, leave=False):
        x = jnp.asarray(x)  # cast on device: XLA's convert is much faster than numpy's for bfloat16
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != param_dtype:
            x = x.astype(param_dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def check_output_folder(folder: str, overwrite: bool) -> None:
    """FileExistsError unless `save_pretrained` may write into `folder` (checked before any work): new or
    empty, or `overwrite`, and never a training run's workdir."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder")
    if os.path.isdir(folder) and run_folders.is_run_folder(folder):
        raise FileExistsError(f"{folder} is a flax_gpt2 training run: an export written into it would be what "
                              "from_pretrained, sample, evaluate and serve load instead of the run's newest checkpoint."
                              f" Write it to a folder of its own (e.g. {folder.rstrip(os.sep)}-export)")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        held = sorted(os.listdir(folder))
        raise FileExistsError(f"{folder} is not empty (holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''});"
                              " pass overwrite=True to write into it (only the files a save writes are replaced)")


def _remove_stale_weights(folder: str, keep: list[str], format: str = "safetensors") -> None:
    """Removes weights a save did not write that could be loaded instead of (or mixed with) the new ones
    (run once the new ones are in place): an old safetensors index or shards, and, after a msgpack save,
    every other format too, since `formats.find_weights` prefers them all to msgpack."""
    stale_names = {files.SAFETENSORS, files.SAFETENSORS_INDEX}
    stale_shards = [_SHARD[files.SAFETENSORS_INDEX]]
    if format == "msgpack":
        stale_names |= {files.TORCH_BIN, files.TORCH_BIN_INDEX}
        stale_shards.append(_SHARD[files.TORCH_BIN_INDEX])
    for name in os.listdir(folder):
        if name not in keep and (name in stale_names or any(re.fullmatch(p, name) for p in stale_shards)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _save_tokenizer(folder: str, tokenizer, model=None) -> None:
    if tokenizer is None or tokenizer is False:
        return
    source = _LOADED_FROM.get(id(model)) if tokenizer is True else None
    if source is not None and bpe_files.tokenizer_files(source) is not None:
        tokenizer = source
    if hasattr(tokenizer, "save"):
        tokenizer.save(folder)
        return
    if tokenizer is True:
        try:
            tok = get_tokenizer(None)
        except Exception as e:  # e.g. offline with no cached encoding: the weights are still worth saving
            warnings.warn(f"the GPT-2 tokenizer could not be loaded ({e}); no tokenizer files were written. "
                          "Pass tokenizer=<folder with vocab.json + merges.txt> to include them.", stacklevel=3)
            return
    else:
        tok = get_tokenizer(os.fspath(tokenizer))
    tok.save(folder)
