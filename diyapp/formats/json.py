"""JSON export: the whole model as one JSON document any program can read (docs/json-format.md).

The document is one JSON object written line by line so that it stays fast and lean at size:

    line 1   {"format":"diyapp-json","format_version":1,"config":{..},"metadata":{..},
              "has_train_state":false,"tied_weights":{..},
    line 2   "tokenizer":{ the Hugging Face tokenizers JSON },
    line 3   "vocab":["<|endoftext|>", ...],                 (index = token id)
    [        "train_state":{ plain data, tensors as {"$tensor": name} },
             "train_state_tensors":{
             "<name>":{"shape":[..],"dtype":"..","data":[..]},   (one per line)
             },                                                  ]
             "tensors":{
             "<state-dict name>":{"shape":[..],"dtype":"float32","data":[..]},   (one per line)
             }
             }

Any JSON parser reads it whole; :func:`describe_json` reads only line 1 and :func:`load_model_json`
parses one line (one tensor) at a time, each in chunks, so memory stays near one tensor's size.
A file with another layout (re-indented by some tool, say) still loads through a full parse.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from queue import Queue
from typing import Any, Iterator

import orjson

from .common import (
    CheckpointError,
    LoadedModel,
    atomic_write,
    build_loaded,
    check_finite,
    check_format_header,
    fill_metadata,
    first_line,
    load_tokenizer,
    model_state,
    plain_state,
    stat_file,
    tokenizer_string,
    unwrap_model,
)

JSON_FORMAT = "diyapp-json"
JSON_VERSION = 1
#: How many bytes of number text one orjson call parses; small pieces parse fastest.
_CHUNK_BYTES = 1 << 20
#: Line 1 (format, config, metadata) is at most this long; describe reads no further.
_MAX_HEADER_BYTES = 16 << 20

# torch dtype name -> (numpy dtype the "data" numbers are parsed as)
_DTYPES = {
    "float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "float32",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}
_OPTS = orjson.OPT_SERIALIZE_NUMPY


class _Layout(Exception):
    """The file is not laid out line by line as we write it (fall back to a full parse)."""


# --- writing -------------------------------------------------------------------------------------

def _tensor_spec(path: Path, name: str, t: Any, dtype: str | None = None) -> bytes:
    """``"name":{"shape":..,"dtype":..,"data":[..]}`` for one tensor; refuses non-finite values."""
    import torch

    t = t.detach().cpu()
    dtype = dtype or str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise CheckpointError(path, f"无法导出：JSON 格式存不了这种类型 cannot export: tensor {name} has dtype {dtype}, which the JSON format "
                                    "does not hold")
    if t.is_floating_point():  # (finiteness was checked before the file was opened)
        if dtype in ("float32", "bfloat16"):
            t = t.to(torch.float32)
    array = t.contiguous().numpy().reshape(-1)
    spec = {"shape": list(t.shape), "dtype": dtype, "data": array}
    return orjson.dumps(name) + b":" + orjson.dumps(spec, option=_OPTS)


def _encode_state(value: Any, where: str, tensors: dict[str, Any], path: Path) -> Any:
    """Training state as JSON: tensors move to ``tensors`` and leave ``{"$tensor": name}``;
    tuples, non-string-keyed dicts, non-finite floats and huge ints are tagged to come back exact."""
    import torch

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else {"$int": str(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, torch.Tensor):
        name, n = where, 1
        while name in tensors:
            n += 1
            name = f"{where}#{n}"
        tensors[name] = value
        return {"$tensor": name}
    if isinstance(value, list):
        return [_encode_state(v, f"{where}.{i}", tensors, path) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [_encode_state(v, f"{where}.{i}", tensors, path) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode_state(v, f"{where}.{k}", tensors, path) for k, v in value.items()}
        return {"$dict": [[_encode_state(k, f"{where}.key", tensors, path),
                           _encode_state(v, f"{where}.{k}", tensors, path)] for k, v in value.items()]}
    raise CheckpointError(path, f"无法导出：训练状态只能是普通数据 cannot export: train_state {where} is a {type(value).__name__}, not plain data")


def _vocab(tokenizer: Any) -> list[str]:
    if tokenizer is None or isinstance(tokenizer, str):
        return []
    text = getattr(tokenizer, "token_text", None)
    if text is None:
        return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    return [text(i) for i in range(tokenizer.vocab_size)]


def save_model_json(path: str | os.PathLike, model: Any, tokenizer: Any, *, metadata: dict[str, Any] | None = None,
                    include_optimizer: bool = False, train_state: Any = None) -> Path:
    """Export the model (and, with ``include_optimizer=True``, ``train_state``) as JSON.

    Every float32 is written in its shortest exact decimal form and reads back bit-exact. A NaN or
    infinity anywhere in the weights raises :class:`CheckpointError` and writes nothing.
    """
    path = Path(path)
    model = unwrap_model(model)
    config = model.config
    if include_optimizer and train_state is None:
        raise ValueError("include_optimizer=True needs the train_state to write")
    state = model_state(model)
    tied = {}
    if config.tie_word_embeddings and "lm_head.weight" in state:
        tied = {"lm_head.weight": "model.embed_tokens.weight"}
        state.pop("lm_head.weight")
    written_state = train_state if include_optimizer else None
    meta = fill_metadata(path, model, metadata, train_state)
    tok_text = tokenizer_string(path, tokenizer, config.vocab_size)
    header = {"format": JSON_FORMAT, "format_version": JSON_VERSION, "config": config.to_dict(),
              "metadata": meta, "has_train_state": written_state is not None, "tied_weights": tied}
    # Encode everything before opening the file: a bad value then leaves no temporary file behind.
    lines = [orjson.dumps(header)[:-1] + b",\n"]
    lines.append(b'"tokenizer":' + (orjson.dumps(orjson.loads(tok_text)) if tok_text is not None else b"null")
                 + b",\n")
    lines.append(b'"vocab":' + orjson.dumps(_vocab(tokenizer)) + b",\n")
    state_tensors: dict[str, Any] = {}
    if written_state is not None:
        encoded = _encode_state(plain_state(path, written_state), "train_state", state_tensors, path)
        lines.append(b'"train_state":' + orjson.dumps(encoded) + b",\n")
    # Check every weight before writing any (a diverged model fails fast).
    for name, t in list(state.items()) + list(state_tensors.items()):
        check_finite(path, name, t)

    def pieces() -> Iterator[bytes]:
        yield from lines
        if written_state is not None:
            yield b'"train_state_tensors":{\n'
            yield from _group(path, state_tensors, None)
            yield b"},\n"
        yield b'"tensors":{\n'
        yield from _group(path, state, "float32")
        yield b"}\n}\n"

    with atomic_write(path) as f:
        _write_overlapped(f, pieces())
    return path


def _group(path: Path, tensors: dict[str, Any], dtype: str | None) -> Iterator[bytes]:
    names = list(tensors)
    for i, name in enumerate(names):
        yield _tensor_spec(path, name, tensors[name], dtype) + (b",\n" if i < len(names) - 1 else b"\n")


def _write_overlapped(f: Any, pieces: Iterator[bytes]) -> None:
    """Write ``pieces`` to ``f`` from a helper thread, so the disk works while the next tensor is
    being formatted (file writes release the GIL). At most two pieces wait in memory."""
    errors: list[BaseException] = []
    queue: Queue = Queue(maxsize=2)

    def writer() -> None:
        while (piece := queue.get()) is not None:
            if not errors:
                try:
                    f.write(piece)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    errors.append(exc)

    thread = threading.Thread(target=writer, name="diyapp-json-writer", daemon=True)
    thread.start()
    try:
        for piece in pieces:
            if errors:
                break
            queue.put(piece)
    finally:
        queue.put(None)
        thread.join()
    if errors:
        raise errors[0]


# --- reading -------------------------------------------------------------------------------------

def _check_header(path: Path, header: Any) -> dict[str, Any]:
    return check_format_header(path, header, JSON_FORMAT, JSON_VERSION, "JSON export")


_NOT_ENDED = "文件不完整，导出可能被中断了，请重新导出 is truncated (the JSON document does not end; was the export interrupted?); export again"


def _open_checked(path: Path) -> tuple[Any, int]:
    st = stat_file(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None
    return f, st.st_size


def _ends_complete(f: Any, size: int) -> bool:
    f.seek(max(0, size - 64))
    return f.read().rstrip().endswith(b"}")


def _not_json(path: Path, head: bytes) -> CheckpointError:
    if head.startswith(b"PK\x03\x04"):
        return CheckpointError(path, "这是 .pt 检查点，不是 JSON 导出 is a .pt checkpoint (zip archive), not a JSON export; load it with "
                                     "load_model_binary")
    return CheckpointError(path, "不是 diyapp 的 JSON 导出 is not a diyapp JSON export (not JSON)")


def describe_json(path: str | os.PathLike) -> dict[str, Any]:
    """Format, config and metadata of a JSON export from its first line only."""
    path = Path(path)
    f, size = _open_checked(path)
    with f:
        head = f.read(1)
        f.seek(0)
        if head != b"{":
            raise _not_json(path, f.read(8))
        line = f.readline(_MAX_HEADER_BYTES)
        complete = _ends_complete(f, size)
    try:
        header = orjson.loads(line.rstrip().removesuffix(b",") + b"}")
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or "format" not in header:
        # Not our line layout: maybe our document re-written by another tool. Parse it whole.
        doc = _full_parse(path)
        header = {k: doc.get(k) for k in ("format", "format_version", "config", "metadata", "has_train_state")}
        header["has_train_state"] = doc.get("train_state") is not None
    else:  # (_full_parse checks the header itself)
        _check_header(path, header)
        if not complete:
            raise CheckpointError(path, _NOT_ENDED)
    st = path.stat()
    return {"path": path, "format": "json", "format_version": header["format_version"],
            "config": header["config"], "metadata": header["metadata"],
            "has_train_state": bool(header.get("has_train_state")), "size_bytes": st.st_size,
            "modified": st.st_mtime}


def _full_parse(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        stripped = data.rstrip()
        if stripped.startswith(b"{") and not stripped.endswith(b"}"):
            raise CheckpointError(path, _NOT_ENDED) from None
        raise CheckpointError(path, f"不是有效的 JSON is not valid JSON ({first_line(exc)})") from None
    return _check_header(path, doc)


def _parse_numbers(path: Path, name: str, buf: bytes, start: int, end: int, count: int, np_dtype: str) -> Any:
    """The comma-separated numbers ``buf[start:end]`` as a numpy array, parsed in small pieces."""
    import numpy as np

    if count > (end - start + 1) // 2:  # each value takes a digit and a comma at least
        raise CheckpointError(path, f"文件已损坏 is damaged: tensor {name} claims {count} values but its data has room "
                                    f"for at most {(end - start + 1) // 2}")
    out = np.empty(count, dtype=np_dtype)
    i, pos = 0, start
    try:
        while pos < end:
            cut = end if end - pos <= _CHUNK_BYTES else buf.find(b",", pos + _CHUNK_BYTES, end)
            if cut < 0:
                cut = end
            values = orjson.loads(b"[" + buf[pos:cut] + b"]")
            n = len(values)
            if i + n > count:
                break
            out[i:i + n] = values
            i += n
            pos = cut + 1
    except (orjson.JSONDecodeError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(path, f"文件已损坏 is damaged: the data of tensor {name} cannot be read "
                                    f"({first_line(exc)}; a null means a non-finite value)") from None
    if i != count or pos < end:
        raise CheckpointError(path, f"文件已损坏 is damaged: tensor {name} should hold {count} values")
    return out


def _array_from_spec(path: Path, name: str, spec: Any, data: Any = None) -> Any:
    """A torch tensor from ``{"shape", "dtype", "data"}`` (``data`` already parsed, or a list)."""
    import numpy as np
    import torch

    if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list) or spec.get("dtype") not in _DTYPES:
        raise CheckpointError(path, f"文件已损坏 is damaged: tensor {name} needs \"shape\" and a known \"dtype\"")
    shape = spec["shape"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(path, f"文件已损坏 is damaged: tensor {name} has shape {shape!r}")
    count = math.prod(shape)
    if data is None:
        values = spec.get("data")
        if not isinstance(values, list) or len(values) != count:
            raise CheckpointError(path, f"文件已损坏 is damaged: tensor {name} should hold {count} values")
        try:
            data = np.array(values, dtype=_DTYPES[spec["dtype"]])
        except (TypeError, ValueError, OverflowError) as exc:
            raise CheckpointError(path, f"文件已损坏 is damaged: the data of tensor {name} cannot be read "
                                        f"({first_line(exc)})") from None
    t = torch.from_numpy(data.reshape(shape))
    if spec["dtype"] == "bfloat16":
        t = t.to(torch.bfloat16)
    return t


def _read_group(path: Path, f: Any) -> dict[str, Any]:
    """Tensor lines up to the group's closing brace."""
    out = {}
    while True:
        line = f.readline()
        if not line:
            raise CheckpointError(path, _NOT_ENDED)
        body = line.rstrip()
        if body in (b"}", b"},"):
            return out
        p = body.find(b',"data":[')
        if p < 0 or not body.endswith((b"]}", b"]},")):
            raise _Layout()
        try:
            head = orjson.loads(b"{" + body[:p] + b"}}")
        except orjson.JSONDecodeError:
            raise _Layout() from None
        if not isinstance(head, dict) or len(head) != 1:
            raise _Layout()
        (name, spec), = head.items()
        if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES or not isinstance(spec.get("shape"), list):
            raise CheckpointError(path, f"文件已损坏 is damaged: tensor {name} needs \"shape\" and a known \"dtype\"")
        try:
            count = math.prod(int(d) for d in spec["shape"])
        except (TypeError, ValueError):
            raise CheckpointError(path, f"文件已损坏 is damaged: tensor {name} has shape {spec['shape']!r}") from None
        start, end = p + len(b',"data":['), body.rindex(b"]")
        data = _parse_numbers(path, name, body, start, end, count, _DTYPES[spec["dtype"]])
        out[name] = _array_from_spec(path, name, spec, data)


def _read_lines(path: Path) -> dict[str, Any]:
    """The document read line by line as we write it; raises _Layout for any other layout."""
    f, size = _open_checked(path)
    with f:
        if f.read(1) != b"{":
            f.seek(0)
            raise _not_json(path, f.read(8))
        f.seek(0)
        first = f.readline(_MAX_HEADER_BYTES).rstrip()
        try:
            doc = orjson.loads(first.removesuffix(b",") + b"}")
        except orjson.JSONDecodeError:
            raise _Layout() from None
        if not isinstance(doc, dict) or "format" not in doc:
            raise _Layout()
        _check_header(path, doc)
        while True:
            line = f.readline()
            if not line:
                raise CheckpointError(path, _NOT_ENDED)
            body = line.rstrip()
            if body == b"}":
                return doc
            if body.endswith(b":{") and body.count(b'"') == 2:
                key = orjson.loads(body[:-2])
                doc[key] = _read_group(path, f)
                continue
            try:
                part = orjson.loads(b"{" + body.removesuffix(b",") + b"}")
            except orjson.JSONDecodeError:
                raise _Layout() from None
            doc.update(part)


def _decode_state(path: Path, value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_decode_state(path, v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "$tensor":
            if inner not in tensors:
                raise CheckpointError(path, f"文件已损坏 is damaged: train_state refers to a missing tensor {inner!r}")
            return tensors[inner]
        if tag == "$tuple":
            return tuple(_decode_state(path, v, tensors) for v in inner)
        if tag == "$dict":
            return {_decode_state(path, k, tensors): _decode_state(path, v, tensors) for k, v in inner}
        if tag == "$float":
            return float(inner)
        if tag == "$int":
            return int(inner)
    return {k: _decode_state(path, v, tensors) for k, v in value.items()}


def _tensors_of(path: Path, group: Any) -> dict[str, Any]:
    import torch

    if not isinstance(group, dict):
        raise CheckpointError(path, "文件已损坏 is damaged: a tensor group is not an object")
    return {name: spec if isinstance(spec, torch.Tensor) else _array_from_spec(path, name, spec)
            for name, spec in group.items()}


def load_model_json(path: str | os.PathLike, *, device: Any = None, strict: bool = True) -> LoadedModel:
    """Rebuild the model, tokenizer, metadata (and training state, if exported) from a JSON export.

    Raises :class:`CheckpointError` for a missing, empty, truncated, foreign or newer-version file
    and for weights that do not fit the stored config (unless ``strict=False``).
    """
    path = Path(path)
    try:
        doc = _read_lines(path)
    except _Layout:
        doc = _full_parse(path)
    tensors = _tensors_of(path, doc.get("tensors"))
    for alias, source in (doc.get("tied_weights") or {}).items():
        if source in tensors and alias not in tensors:
            tensors[alias] = tensors[source]
    train_state = None
    if doc.get("train_state") is not None:
        state_tensors = _tensors_of(path, doc.get("train_state_tensors") or {})
        train_state = _decode_state(path, doc["train_state"], state_tensors)
    tok = doc.get("tokenizer")
    tokenizer = load_tokenizer(path, orjson.dumps(tok).decode() if tok is not None else None)
    return build_loaded(path, "json", doc["config"], doc["metadata"], None, tensors, train_state,
                        device=device, strict=strict, tokenizer=tokenizer)
