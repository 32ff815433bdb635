"""The GGUF export: a single ``.gguf`` file that llama.cpp, Ollama and LM Studio run as a Llama model.

Written with the ``gguf`` package (llama.cpp's own writer): architecture ``llama``, every
hyperparameter key llama.cpp reads, the weights under llama.cpp's tensor names and the tokenizer
as a ``gpt2``-type byte-level BPE, so llama.cpp tokenises any text to the ids our tokenizer gives.

Two layout details (the same ones llama.cpp's ``convert_hf_to_gguf.py`` handles for Hugging Face
Llama checkpoints, whose layout ours matches, see ``formats/hf.py``):

* our fused ``qkv_proj`` / ``gate_up_proj`` matrices are split into q, k, v and gate, up;
* our rotary embedding rotates the two halves of each head (``rotate_half``), llama.cpp's rotates
  neighbouring pairs, so the rows of q and k are reordered within each head: row ``i`` of the
  first half goes to ``2i`` and row ``i`` of the second half to ``2i + 1``.

Beside ``X.gguf`` an Ollama Modelfile ``X.Modelfile`` is written (``FROM ./X.gguf``, ChatML, our
sampling). Our config and training metadata ride along as ``diyapp.config`` / ``diyapp.metadata``.
This is an export only: diyapp does not load GGUF files back, but :func:`describe_gguf` reads its
header for ``info`` and ``list``.

The two files are one export: two renames cannot be one step, so the pair is made so that a kill
between them is never silent. Each export gets a random id, stored in the GGUF
(``diyapp.export_id``) and in the Modelfile's last line (``# diyapp export <id>: X.gguf, N bytes,
sha256 H``). The GGUF is written to its temporary file first, then the Modelfile is put in place,
then the GGUF: the ``.gguf`` on disk is always a complete one, and a kill between the two renames
leaves a new Modelfile beside the old GGUF, which :func:`pair_problem` (so ``describe_gguf``, and
``info`` and ``list``) reports as a mismatch in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    CheckpointError,
    atomic_path,
    atomic_write,
    check_finite,
    fill_metadata,
    unfused_state,
    unwrap_model,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch import Tensor

    from ..config import DIYConfig

#: The weight types one can choose; norms (1-D tensors) are always written as f32.
GGUF_TYPES = ("f32", "f16", "q8_0")
DEFAULT_GGUF_TYPE = "f32"
#: The pre-tokenizer name llama.cpp knows for GPT-2's split (``'s|'t|..| ?\\p{L}+| ?\\p{N}+|..``),
#: which is what ``tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)`` does.
PRE_TOKENIZER = "gpt-2"
#: How a GGUF file starts.
GGUF_MAGIC = b"GGUF"
#: The GGUF key holding the id of the export the Modelfile beside it must name.
EXPORT_ID_KEY = "diyapp.export_id"
#: The Modelfile's last line: which GGUF it was written with.
_STAMP = re.compile(r"^# diyapp export (?P<id>[0-9a-f]{32}): (?P<name>.+), (?P<size>\d+) bytes, sha256 (?P<sha>[0-9a-f]{64})$")
#: Ollama's Go template for ChatML (the same turns as our chat template).
OLLAMA_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                   '<|im_start|>assistant\n')


def rotary_to_interleaved(w: "Tensor", n_heads: int) -> "Tensor":
    """Rows of a q or k projection reordered from the rotate-half layout (per head: first halves,
    then second halves) to llama.cpp's pairwise layout (per head: x0, y0, x1, y1, ...)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(model: Any) -> dict[str, "Tensor"]:
    """Our weights under llama.cpp names in llama.cpp's layout, float32 on the CPU (a tied head is
    left out: llama.cpp then uses ``token_embd`` for the output, as we do)."""
    import gguf
    import torch

    model = unwrap_model(model)
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    out: dict[str, Tensor] = {}
    for hf_name, t in unfused_state(model).items():
        t = t.detach().to("cpu", torch.float32)
        if hf_name.endswith("q_proj.weight"):
            t = rotary_to_interleaved(t, config.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = rotary_to_interleaved(t, config.num_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:  # pragma: no cover - a model change this exporter does not know yet
            raise ValueError(f"no llama.cpp name for weight {hf_name}")
        out[name] = t.contiguous()
    return out


def _token_lists(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (as stored in the BPE vocabulary: GPT-2 byte characters), their llama.cpp types
    (special tokens are control tokens; rows the tokenizer does not use are padding) and merges."""
    import gguf

    doc = json.loads(tokenizer.to_str())
    vocab = doc["model"]["vocab"]
    specials = {t["id"]: t["content"] for t in doc.get("added_tokens", []) if t.get("special")}
    by_id = {i: tok for tok, i in vocab.items()}
    by_id.update(specials)
    tokens, types = [], []
    for i in range(vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(int(gguf.TokenType.CONTROL))
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"].get("merges", [])]
    return tokens, types, merges


def _weight_array(name: str, t: "Tensor", gguf_type: str) -> tuple["np.ndarray", Any]:
    """The array to store and its raw GGML type (None: the numpy dtype says it)."""
    import gguf
    import numpy as np

    data = t.numpy()
    if data.ndim == 1 or gguf_type == "f32":
        return data.astype(np.float32), None
    if gguf_type == "q8_0":
        qtype = gguf.GGMLQuantizationType.Q8_0
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if data.shape[-1] % block == 0:
            return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16), None  # f16, or a q8_0 row that does not fill whole blocks


def _sampling() -> Any:
    from ..generation import GenerationConfig

    return GenerationConfig()


def export_gguf(path: str | os.PathLike, model: Any, tokenizer: Any, *, gguf_type: str = DEFAULT_GGUF_TYPE,
                metadata: dict[str, Any] | None = None, modelfile: bool = True) -> Path:
    """Write ``path`` (a ``.gguf`` file for llama.cpp / Ollama) and, with ``modelfile``, an Ollama
    Modelfile beside it (:func:`modelfile_path`). ``gguf_type`` is "f32" (exact), "f16" or "q8_0". Refuses (with
    :class:`CheckpointError`, writing nothing) a model without tokenizer or with non-finite
    weights. Returns the path of the ``.gguf`` file."""
    import gguf

    path = Path(path)
    if gguf_type not in GGUF_TYPES:
        raise CheckpointError(path, f"未知的 GGUF 类型 unknown GGUF type {gguf_type!r}; 可选 choose one of {', '.join(GGUF_TYPES)}")
    if path.is_dir():
        raise CheckpointError(path, "这是文件夹，请给出 .gguf 文件名 is a folder; give a file name ending in .gguf")
    model = unwrap_model(model)
    config: DIYConfig = model.config
    if tokenizer is None or isinstance(tokenizer, str):
        raise CheckpointError(path, "模型没有词表，无法导出 cannot export: the model has no tokenizer")
    tensors = gguf_tensors(model)
    for name, t in tensors.items():
        check_finite(path, name, t)
    tokens, types, merges = _token_lists(tokenizer, config.vocab_size)
    meta = fill_metadata(path, model, metadata)
    g = _sampling()

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(str(meta.get("name") or path.stem))
    writer.add_description("diyapp: a small GPT trained from scratch")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos, im_end = tokenizer.eos_token_id, tokenizer.im_end_id
    writer.add_bos_token_id(eos)  # GPT-2's convention; never added (add_bos_token is false)
    writer.add_eos_token_id(eos)
    writer.add_eot_token_id(im_end)  # a chat turn ends here
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    writer.add_string("diyapp.config", json.dumps(config.to_dict()))
    writer.add_string("diyapp.metadata", json.dumps(meta, ensure_ascii=False))
    export_id = uuid.uuid4().hex
    writer.add_string(EXPORT_ID_KEY, export_id)
    writer.add_sampling_temp(g.temperature)
    if g.top_k:
        writer.add_sampling_top_k(g.top_k)
    if g.top_p:
        writer.add_sampling_top_p(g.top_p)
    for name, t in tensors.items():
        data, raw_dtype = _weight_array(name, t, gguf_type)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    with atomic_path(path) as tmp:
        writer.open_output_file(tmp)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        if modelfile:  # in place before the GGUF (see the module docstring)
            write_modelfile(modelfile_path(path), path, config, stamp=_stamp(export_id, path.name, tmp))
    return path


def _stamp(export_id: str, name: str, written: Path) -> str:
    """The Modelfile line naming the GGUF it belongs to (its id, size and sha256)."""
    digest = hashlib.sha256()
    with open(written, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"# diyapp export {export_id}: {name}, {written.stat().st_size} bytes, sha256 {digest.hexdigest()}"


def modelfile_path(gguf_path: str | os.PathLike) -> Path:
    """Where the Modelfile of ``X.gguf`` goes: ``X.Modelfile`` beside it (``ollama create NAME -f X.Modelfile``)."""
    path = Path(gguf_path)
    return path.with_name(path.stem + ".Modelfile")


def modelfile_text(gguf_path: str | os.PathLike, config: "DIYConfig", stamp: str = "") -> str:
    """An Ollama Modelfile for ``gguf_path`` (referred to beside the Modelfile): ChatML turns,
    ``<|im_end|>`` as the stop token, our default sampling settings and context length, and last
    the ``stamp`` line (a comment for Ollama) naming the export it belongs to."""
    g = _sampling()
    lines = [f"FROM ./{Path(gguf_path).name}", "", f'TEMPLATE """{OLLAMA_TEMPLATE}"""', "",
             'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"',
             f"PARAMETER temperature {g.temperature}"]
    if g.top_k:
        lines.append(f"PARAMETER top_k {g.top_k}")
    if g.top_p:
        lines.append(f"PARAMETER top_p {g.top_p}")
    lines += [f"PARAMETER repeat_penalty {g.repetition_penalty}", f"PARAMETER num_predict {g.max_new_tokens}",
              f"PARAMETER num_ctx {config.max_seq_len}"]
    if stamp:
        lines += ["", stamp]
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | os.PathLike, gguf_path: str | os.PathLike, config: "DIYConfig",
                    stamp: str = "") -> Path:
    """Write :func:`modelfile_text` to ``path`` atomically."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(modelfile_text(gguf_path, config, stamp).encode("utf-8"))
    return path


def _read_fields(path: Path) -> dict[str, Any]:
    """The string fields of a GGUF header that describe our export (``gguf``'s reader maps the file;
    no tensor data is read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, struct.error, ... for a damaged file
        raise CheckpointError(path, f"不是完整的 GGUF 文件 is not a readable GGUF file ({exc})") from None
    out = {}
    for key in ("diyapp.config", "diyapp.metadata", EXPORT_ID_KEY):
        field = reader.get_field(key)
        out[key] = None if field is None else str(field.contents())
    out["tensors"] = len(reader.tensors)
    return out


def pair_problem(path: str | os.PathLike, export_id: str | None) -> str | None:
    """Why the Modelfile beside the GGUF ``path`` (whose export id is ``export_id``) is not its
    pair, or None (no Modelfile, the matching one, or a pair from before ids)."""
    path = Path(path)
    mf = modelfile_path(path)
    try:
        lines = mf.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    stamp = next((m for line in reversed(lines) if (m := _STAMP.match(line.strip()))), None)
    if stamp is None and export_id is None:
        return None  # both from before the pairs were stamped
    theirs = stamp["id"] if stamp else "none"
    if stamp is None or export_id != stamp["id"] or stamp["name"] != path.name \
            or int(stamp["size"]) != path.stat().st_size:
        return (f"和旁边的 {mf.name} 不是同一次导出（两个文件之间的保存被中断了），请重新导出 does not match "
                f"{mf.name} beside it (export {export_id or 'none'} here, {theirs} in {mf.name}: a save was "
                f"interrupted between the two files); export again")
    return None


def describe_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """The header of one of our GGUF exports, for ``info`` and ``list`` (in the shape of
    ``catalog.describe_checkpoint``); :class:`CheckpointError` for a damaged file, one that is not
    ours, or one whose Modelfile comes from another export."""
    path = Path(path)
    fields_ = _read_fields(path)
    if fields_["diyapp.config"] is None:
        raise CheckpointError(path, "不是 diyapp 导出的 GGUF is a GGUF file not written by diyapp")
    try:
        config = json.loads(fields_["diyapp.config"])
        metadata = json.loads(fields_["diyapp.metadata"] or "{}")
    except ValueError:
        raise CheckpointError(path, "文件已损坏 is damaged: its diyapp header cannot be read") from None
    problem = pair_problem(path, fields_[EXPORT_ID_KEY])
    if problem:
        raise CheckpointError(path, problem)
    st = path.stat()
    return {"path": path, "format": "gguf", "format_version": 1, "config": config,
            "metadata": metadata if isinstance(metadata, dict) else {}, "has_train_state": False,
            "size_bytes": st.st_size, "modified": st.st_mtime}
