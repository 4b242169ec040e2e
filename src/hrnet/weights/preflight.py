"""Bounded structural checks of a checkpoint, run before anything is built from its bytes.

Python's unpickler and ``torch.load`` trust what a file declares: a 200 KB pickle of 200,000 nested
tuples overflows the C stack when the tuple is hashed (the interpreter dies with SIGSEGV), and a 4 MB
zip of deflated zeros declaring a 2^30-element tensor makes torch allocate 4 GB. So every pickle is
first walked opcode by opcode by :func:`scan_pickle`, which builds only a skeleton (scalars, small
strings, placeholders for containers, calls and large byte strings) and bounds its op count, nesting
depth and payload. Torch files are then checked against their zip directory (or, for legacy pickles,
the file size): every declared storage and tensor must fit in bytes actually present, with a small
allowance for compression. The limits are far above any HRNet checkpoint (hrnet-w64 has 128,056,104
parameters; a training checkpoint with optimizer and EMA state has about 200,000 pickle ops).
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

MAX_OPS = 1_000_000  # pickle opcodes in one pickle (a W64 training checkpoint: ~2e5)
MAX_DEPTH = 64  # nesting of containers (a timm training checkpoint: < 10)
MAX_PICKLE_BYTES = 64 << 20  # a torch data.pkl (W64: ~0.2 MB); tensor data lives in other entries
MAX_TENSOR_ELEMENTS = 1 << 27  # one tensor: more than all of hrnet-w64's parameters together
MAX_INFLATION = 256 << 20  # bytes a torch zip may inflate beyond its size on disk, all entries together
MAX_ZIP_ENTRIES = 100_000  # a W64 training checkpoint with EMA: ~7,000
SMALL = 4096  # strings and byte strings up to this size are kept; longer ones only counted
MAX_SAFETENSORS_HEADER = 16 << 20  # W64's header is ~0.2 MB; safetensors itself allows 100 MB
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# torch's storage classes (the first element of a storage's persistent id) and their element sizes.
STORAGE_ITEMSIZE = {"UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1,
                    "ShortStorage": 2, "HalfStorage": 2, "BFloat16Storage": 2, "IntStorage": 4,
                    "FloatStorage": 4, "LongStorage": 8, "DoubleStorage": 8, "ComplexFloatStorage": 8,
                    "ComplexDoubleStorage": 16}
DTYPE_ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "int16": 2, "float16": 2, "bfloat16": 2, "int32": 4,
                  "float32": 4, "int64": 8, "float64": 8}
VIEW_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3")  # (storage, offset, shape, stride, ...)
PARAMETER_REBUILDS = ("_rebuild_parameter", "_rebuild_parameter_with_state")  # wrap a tensor rebuilt by the above


class Node:
    """A container, call or global in the skeleton of a pickle; ``items`` are its children."""

    __slots__ = ("kind", "items", "name", "args", "depth")

    def __init__(self, kind: str, items: list | None = None, name: tuple[str, str] | None = None,
                 args: Any = None):
        self.kind, self.items, self.name, self.args = kind, items if items is not None else [], name, args
        self.depth = 1 + max((c.depth for c in self.items if isinstance(c, Node)), default=0)
        if self.depth > MAX_DEPTH:  # refused as soon as it is built; _check_depth covers later mutation
            raise _TooDeep


class _TooDeep(Exception):
    pass


class Blob:
    """A string or byte string too long to keep: only its length is known."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


class Skeleton:
    """What a pickle declares: its root, its persistent ids, every call, and the bytes it holds inline."""

    def __init__(self) -> None:
        self.root: Any = None
        self.pids: list[Any] = []
        self.calls: list[Node] = []
        self.inline_bytes = 0  # long strings and byte strings, counted at every reference (memo reuse too)


_SCALARS = frozenset(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
                      "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
                      "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT"))
_OPS = {op.code.encode("latin1"): op for op in pickletools.opcodes}
_FIXED = {"uint1": "<B", "uint2": "<H", "int4": "<i", "uint4": "<I", "float8": ">d", "uint8": "<Q"}
_LEN_PREFIX = {"long1": 1, "string1": 1, "bytes1": 1, "unicodestring1": 1, "long4": 4, "string4": 4,
               "bytes4": 4, "unicodestring4": 4, "bytes8": 8, "bytearray8": 8, "unicodestring8": 8}


def scan_pickle(f: BinaryIO, limit: int, where: str) -> Skeleton:
    """Walk one pickle from ``f`` up to its STOP without unpickling it; ``limit`` is the bytes left.

    Refuses (CheckpointError naming ``where``) a truncated stream, more than MAX_OPS ops, a length
    beyond the bytes left, nesting deeper than MAX_DEPTH, cycles, out-of-band buffers and extension
    codes. The returned skeleton lets callers check declared storages and tensor shapes.
    """
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: refused before unpickling: {why}")

    try:
        sk = _scan(f, limit, refuse)
    except _TooDeep:  # raised by a Node as soon as it is built or grown too deep
        raise refuse(f"containers nested more than {MAX_DEPTH} deep") from None
    _check_depth(sk.root, refuse)  # nesting made later through memoised containers
    return sk


def _scan(f: BinaryIO, limit: int, refuse: Callable[[str], CheckpointError]) -> Skeleton:
    """The opcode loop of :func:`scan_pickle`: the unpickler's stack, memo and marks, on skeletons."""

    sk, stack, marks, memo = Skeleton(), [], [], {}
    pos = 0  # bytes consumed; counted here because f.tell() costs a system call per op

    def read(n: int) -> bytes:
        nonlocal pos
        data = f.read(n) if n <= limit - pos else b""
        if len(data) != n:
            raise refuse("truncated, or a length that runs past the end of the file")
        pos += n
        return data

    def pop_mark() -> list:
        if not marks:
            raise refuse("malformed (no MARK)")
        items = stack[marks[-1]:]
        del stack[marks.pop():]
        return items

    def pop(n: int = 1) -> list:
        if len(stack) - (marks[-1] if marks else 0) < n:
            raise refuse("malformed (stack underflow)")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    def top() -> Any:
        if len(stack) <= (marks[-1] if marks else 0):
            raise refuse("malformed (stack underflow)")
        return stack[-1]

    def push(value: Any) -> None:
        if isinstance(value, Blob):
            sk.inline_bytes += value.size
        stack.append(value)

    def add_to(container: Any, items: list) -> None:
        if not isinstance(container, Node):
            raise refuse("malformed (adds items to a scalar)")
        container.items.extend(items)
        container.depth = max(container.depth, 1 + max((c.depth for c in items if isinstance(c, Node)), default=0))
        if container.depth > MAX_DEPTH:
            raise _TooDeep

    for count in range(MAX_OPS + 1):
        if count == MAX_OPS:
            raise refuse(f"more than {MAX_OPS:,} pickle ops")
        code = read(1)
        op = _OPS.get(code)
        if op is None:
            raise refuse(f"unknown pickle opcode {code!r}")
        arg: Any = None
        kind = op.arg.name if op.arg is not None else None
        if kind in _FIXED:
            arg = struct.unpack(_FIXED[kind], read(op.arg.n))[0]
        elif kind in _LEN_PREFIX:
            width = _LEN_PREFIX[kind]
            n = int.from_bytes(read(width), "little", signed=kind in ("long4", "string4"))
            if n < 0:
                raise refuse("negative length")
            if kind.startswith("long"):
                if n > 64:
                    raise refuse(f"an integer of {n:,} bytes")
                arg = int.from_bytes(read(n), "little", signed=True)
            elif n > SMALL:  # skipped, not read: its length alone matters
                if n > limit - pos:
                    raise refuse("truncated, or a length that runs past the end of the file")
                f.seek(n, io.SEEK_CUR)
                pos += n
                arg = Blob(n)
            else:
                raw = read(n)
                arg = raw.decode("utf-8", "surrogatepass") if "unicode" in kind else \
                    raw.decode("latin1") if "string" in kind else raw
        elif kind is not None:  # a protocol-0 text argument ending at a newline (two for GLOBAL/INST)
            text = b""
            for _ in range(2 if kind == "stringnl_noescape_pair" else 1):
                line = f.readline(SMALL)
                pos += len(line)
                if not line.endswith(b"\n") or pos > limit:
                    raise refuse("truncated, or an over-long text argument")
                text += line
            try:
                arg = op.arg.reader(io.BytesIO(text))
            except ValueError as e:
                raise refuse(f"malformed {op.name} argument ({e})") from None
        name = op.name
        if name == "STOP":
            sk.root = pop()[0]
            break
        if name in ("PROTO", "FRAME", "READONLY_BUFFER"):
            continue
        if name in _SCALARS:
            push(arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            push({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
            push(Node(name[6:].lower()))
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("LIST", "DICT", "TUPLE", "FROZENSET"):
            push(Node(name.lower(), pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            push(Node("tuple", pop(int(name[-1]))))
        elif name in ("APPEND", "SETITEM", "BUILD"):
            items = pop(1 if name == "APPEND" else 2 if name == "SETITEM" else 1)
            add_to(top(), items)
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            items = pop_mark()
            add_to(top(), items)
        elif name == "POP":
            pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            push(top())
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = top()
        elif name == "MEMOIZE":
            memo[len(memo)] = top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise refuse(f"malformed (memo {arg} read before it is written)")
            push(memo[arg])
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            g = Node("global", name=(module, attr))
            push(g if name == "GLOBAL" else _call(sk, g, Node("tuple", pop_mark())))
        elif name == "STACK_GLOBAL":
            module, attr = pop(2)
            if not isinstance(module, str) or not isinstance(attr, str):
                raise refuse("malformed STACK_GLOBAL")
            push(Node("global", name=(module, attr)))
        elif name in ("REDUCE", "NEWOBJ"):
            func, args = pop(2)
            push(_call(sk, func, args))
        elif name == "NEWOBJ_EX":
            func, args, kwargs = pop(3)
            push(_call(sk, func, args, [kwargs]))
        elif name == "OBJ":
            items = pop_mark()
            if not items:
                raise refuse("malformed OBJ")
            push(_call(sk, items[0], Node("tuple", items[1:])))
        elif name in ("PERSID", "BINPERSID"):
            pid = arg if name == "PERSID" else pop()[0]
            sk.pids.append(pid)
            push(Node("persistent", [pid], args=pid))
        else:  # NEXT_BUFFER, EXT1/2/4: nothing a checkpoint writer emits
            raise refuse(f"uses the {name} opcode")
    return sk


def _call(sk: Skeleton, func: Any, args: Any, extra: list | None = None) -> Node:
    node = Node("call", [func, args, *(extra or [])], name=func.name if isinstance(func, Node) else None, args=args)
    sk.calls.append(node)
    return node


def _check_depth(root: Any, refuse: Any) -> None:
    """The longest chain of nested containers below ``root``, without recursion; cycles are refused."""
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    todo: list[tuple[Any, bool]] = [(root, False)]
    while todo:
        node, done = todo.pop()
        if not isinstance(node, Node):
            continue
        key = id(node)
        if done:
            on_path.discard(key)
            d = 1 + max((depth[id(c)] for c in node.items if isinstance(c, Node)), default=0)
            if d > MAX_DEPTH:
                raise refuse(f"containers nested more than {MAX_DEPTH} deep")
            depth[key] = d
        elif key in on_path:
            raise refuse("a container that contains itself")
        elif key not in depth:
            on_path.add(key)
            todo.append((node, True))
            todo.extend((c, False) for c in node.items if isinstance(c, Node) and id(c) not in depth)


def _values(node: Any) -> Any:
    """A tuple skeleton's plain values (nested tuples too); other nodes stay as they are."""
    if isinstance(node, Node) and node.kind == "tuple":
        return tuple(_values(c) for c in node.items)
    return node


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _storage(pid: Any, where: str) -> tuple[str, int, int]:
    """A torch storage persistent id -> (key, declared bytes, element size)."""
    pid = _values(pid)
    kind = pid[1] if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" else None
    if not (isinstance(kind, Node) and kind.kind == "global" and kind.name[0] == "torch"
            and kind.name[1] in STORAGE_ITEMSIZE and isinstance(pid[2], str) and _ints(pid[4:5])):
        raise CheckpointError(f"{where}: refused before unpickling: a malformed storage reference")
    itemsize = STORAGE_ITEMSIZE[kind.name[1]]
    return pid[2], pid[4] * itemsize, itemsize


def _view_bytes(sk: Skeleton, where: str) -> int:
    """Refuse tensors that are not dense or exceed MAX_TENSOR_ELEMENTS; the bytes all tensors would take.

    Torch itself checks that a view stays inside its storage, but a stride-0 view of one element can
    declare any shape, and materialising it (a dtype cast, a NaN check) allocates all of it.
    """
    total = 0
    for call in sk.calls:
        if call.name is None or call.name[0] != "torch._utils" or not call.name[1].startswith("_rebuild_"):
            continue
        if call.name[1] not in VIEW_REBUILDS + PARAMETER_REBUILDS:
            raise CheckpointError(f"{where}: refused: holds a {call.name[1][len('_rebuild_'):]} tensor, "
                                  "not a dense weight")
        if call.name[1] in PARAMETER_REBUILDS:
            continue
        args = _values(call.args)
        if not (isinstance(args, tuple) and len(args) >= 4 and isinstance(args[0], Node)
                and args[0].kind == "persistent" and _ints(args[2])):
            raise CheckpointError(f"{where}: refused before unpickling: a malformed tensor record")
        numel = math.prod(args[2])
        if numel > MAX_TENSOR_ELEMENTS:
            raise CheckpointError(f"{where}: refused: declares a tensor of shape {list(args[2])} ({numel:,} elements; "
                                  f"at most {MAX_TENSOR_ELEMENTS:,})")
        itemsize = _storage(args[0].args, where)[2]
        if call.name[1] == "_rebuild_tensor_v3":  # an untyped storage; the dtype comes after the usual args
            dtype = args[6] if len(args) > 6 else None
            itemsize = DTYPE_ITEMSIZE.get(dtype.name[1], 16) if isinstance(dtype, Node) and dtype.name else 16
        total += numel * itemsize
    return total


def check_torch_zip(path: Path) -> None:
    """Refuse a torch zip whose directory, pickle or declared tensors promise more than its bytes hold."""
    where = str(path)
    try:
        with open(path, "rb") as raw:
            end = zipfile._EndRecData(raw)  # the entry count, read before zipfile builds one object per entry
            if end and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ZIP_ENTRIES:
                raise CheckpointError(f"{where}: refused: a zip directory of {end[zipfile._ECD_ENTRIES_TOTAL]:,} "
                                      f"entries (at most {MAX_ZIP_ENTRIES:,})")
            with zipfile.ZipFile(raw) as zf:
                infos = zf.infolist()
                pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
                if len(pkl) != 1:
                    raise CheckpointError(f"{where}: corrupt torch file (no single data.pkl in its zip)")
                prefix = pkl[0].filename[:-len("data.pkl")]
                inflation = sum(max(0, i.file_size - i.compress_size) for i in infos)
                if inflation > MAX_INFLATION:
                    raise CheckpointError(f"{where}: refused: its zip entries inflate to {inflation:,} bytes more than "
                                          f"they take on disk (at most {MAX_INFLATION:,})")
                if pkl[0].file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(f"{where}: refused: data.pkl of {pkl[0].file_size:,} bytes")
                with zf.open(pkl[0]) as f:
                    data = f.read(pkl[0].file_size + 1)
                sizes = {i.filename[len(prefix) + len("data/"):]: i.file_size for i in infos
                         if i.filename.startswith(prefix + "data/")}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{where}: corrupt or truncated torch file ({e})") from None
    sk = scan_pickle(io.BytesIO(data), len(data), f"{where} (data.pkl)")
    storages: dict[str, int] = {}
    for pid in sk.pids:
        key, nbytes, _ = _storage(pid, where)
        if key not in sizes:
            raise CheckpointError(f"{where}: corrupt torch file (storage {key} is not in the zip)")
        if nbytes > sizes[key]:
            raise CheckpointError(f"{where}: refused: storage {key} declares {nbytes:,} bytes but holds {sizes[key]:,}")
        storages[key] = nbytes
    views = _view_bytes(sk, where)
    if views > sum(storages.values()) + MAX_INFLATION:
        raise CheckpointError(f"{where}: refused: its tensors view {views:,} bytes of {sum(storages.values()):,} stored")


def check_torch_legacy(path: Path) -> None:
    """A pre-1.6 torch pickle: five pickles, then raw storages that must fit in the rest of the file."""
    where, size = str(path), path.stat().st_size
    with open(path, "rb") as f:
        skeletons = [scan_pickle(f, size - f.tell(), where) for _ in range(4)]  # magic, protocol, sys info, data
        main = skeletons[3]
        scan_pickle(f, size - f.tell(), where)  # the storage keys
        rest = size - f.tell()
    storages: dict[str, int] = {}
    for pid in main.pids:
        key, nbytes, _ = _storage(pid, where)
        storages[key] = max(storages.get(key, 0), nbytes)
    if sum(storages.values()) > rest:
        raise CheckpointError(f"{where}: refused: declares {sum(storages.values()):,} bytes of storages but only "
                              f"{rest:,} bytes follow")
    views = _view_bytes(main, where)
    if views > sum(storages.values()) + MAX_INFLATION:
        raise CheckpointError(f"{where}: refused: its tensors view {views:,} bytes of {sum(storages.values()):,} stored")


def check_plain_pickle(f: BinaryIO, size: int, where: str) -> None:
    """A .pdparams pickle: bounded, complete, and holding no more inline data than the file has."""
    sk = scan_pickle(f, size, where)
    if sk.inline_bytes > size:  # one memoised byte string reused for many arrays: each would be a copy
        raise CheckpointError(f"{where}: refused: reuses its data to build {sk.inline_bytes:,} bytes of arrays "
                              f"from a {size:,}-byte file")
    f.seek(0)


def check_safetensors(path: Path) -> None:
    """The header is bounded JSON, every tensor's dtype, shape and offsets agree, and they tile the file exactly."""
    where, size = str(path), path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise CheckpointError(f"{where}: corrupt or truncated safetensors file (header length {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: corrupt safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not an object)")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_ITEMSIZE and \
            isinstance(entry.get("shape"), list) and _ints(tuple(entry["shape"])) and \
            isinstance(entry.get("data_offsets"), list) and _ints(tuple(entry["data_offsets"]))
        if not ok or len(entry["data_offsets"]) != 2:
            raise CheckpointError(f"{where}: corrupt safetensors header (entry {name[:80]!r})")
        begin, end = entry["data_offsets"]
        numel = math.prod(entry["shape"])
        if numel > MAX_TENSOR_ELEMENTS:
            raise CheckpointError(f"{where}: refused: tensor {name[:80]!r} has {numel:,} elements "
                                  f"(at most {MAX_TENSOR_ELEMENTS:,})")
        if end - begin != numel * SAFETENSORS_ITEMSIZE[entry["dtype"]]:
            raise CheckpointError(f"{where}: corrupt safetensors file (tensor {name[:80]!r}: its offsets "
                                  "do not match its shape)")
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise CheckpointError(f"{where}: corrupt safetensors file (tensor data overlaps or leaves gaps)")
        covered = end
    if 8 + n + covered != size:
        raise CheckpointError(f"{where}: corrupt or truncated safetensors file ({size:,} bytes, its header "
                              f"declares {8 + n + covered:,})")
