"""Reading .npz files safely: never unpickling, never allocating more than a cap.

An .npz is a zip of .npy arrays. Before any array data is read, every size the file
declares is checked: the zip directory (members, declared sizes, compression), then each
.npy header (shape, dtype). Only plain numeric arrays are read (object arrays, which
np.load would unpickle, are refused), and no member is inflated past the size it declares,
so a hostile file costs bounded memory and time whatever it claims or inflates to.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib

import numpy as np

from stages.runtime.failures import DataError, one_line

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip

# Caps on what an .npz may declare, checked from its zip directory and each .npy header
# before any array is read, so a file claiming millions of images (or a zip bomb) is
# refused in milliseconds instead of exhausting memory. The largest file the pipeline
# handles is normalize's output, 70,000 float32 28×28 images: 220 MB (the raw uint8 file is
# 55 MB). 512 MiB leaves 2.4× headroom for a larger MNIST-format set, and is the most one
# load can be asked to allocate: well under 1 GB.
MAX_NPZ_BYTES = 512 << 20  # all members' declared sizes together (uncompressed)
MAX_MEMBERS = 64  # Keras' layout has 4 arrays; the predictions file 1
# A zip's central directory is parsed whole into Python objects (~10× its size) when the
# file is opened: 64 KiB is ~1,000 entries, far beyond MAX_MEMBERS, and cheap to parse.
MAX_DIRECTORY_BYTES = 64 << 10
MAX_NPY_HEADER = 10_000  # bytes; numpy's own limit for .npy headers (max_header_size)
# A deflated member never needs more compressed bytes than its content plus deflate's worst
# case overhead (zlib's deflateBound: 0.03% + 13 bytes); more means the directory
# understates what it inflates to: the mark of a zip bomb.
DEFLATE_SLACK = 1 << 10
PLAIN_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what a model reads
CHUNK = 1 << 20  # bytes inflated and copied at a time
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB" if size < 1 << 30 else f"{size / (1 << 30):,.1f} GiB"


def _directory_size(f) -> tuple[int, int] | None:
    """(entries, central directory bytes) from a zip's end records, or None if absent.

    Read from the last 64 KiB before zipfile parses the directory, whose size the file
    itself declares. Zip64 records are followed where the classic fields are saturated.
    """
    f.seek(0, 2)
    size = f.tell()
    f.seek(max(0, size - _EOCD.size - 0xFFFF))
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    fields = _EOCD.unpack_from(tail, at)
    entries, cd_size = fields[4], fields[5]
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
        start = at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        if start >= 0 and tail[at - _ZIP64_LOCATOR.size:].startswith(b"PK\x06\x07") \
                and tail[start:].startswith(b"PK\x06\x06"):
            fields = _ZIP64_EOCD.unpack_from(tail, start)
            entries, cd_size = fields[7], fields[8]
    return entries, cd_size


def _check_directory(path, f) -> None:
    found = _directory_size(f)
    if found is None:
        return  # not a zip after all: zipfile says so
    entries, cd_size = found
    if entries > MAX_MEMBERS or cd_size > MAX_DIRECTORY_BYTES:
        raise DataError(
            f"{path}: zip directory declares {entries} members in {cd_size} bytes; at most "
            f"{MAX_MEMBERS} members in {MAX_DIRECTORY_BYTES} bytes are read")


def _check_sizes(path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse from the zip directory alone: too many members, too much declared data, or
    compressed data larger than what it claims to inflate to."""
    if len(infos) > MAX_MEMBERS:
        raise DataError(f"{path}: {len(infos)} members; at most {MAX_MEMBERS} are read")
    total = 0
    for info in infos:
        total += info.file_size
        if info.compress_type == zipfile.ZIP_STORED:
            most = info.file_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            most = info.file_size + info.file_size // 1000 + DEFLATE_SLACK
        else:
            raise DataError(f"{path}: member {info.filename} uses compression method "
                            f"{info.compress_type}; only stored or deflated members are read")
        if info.compress_size > most:
            raise DataError(
                f"{path}: member {info.filename} holds {info.compress_size} compressed bytes "
                f"but declares {info.file_size} uncompressed; refused (a zip bomb?)")
        if info.flag_bits & 0x1:
            raise DataError(f"{path}: member {info.filename} is encrypted")
    if total > MAX_NPZ_BYTES:
        raise DataError(f"{path}: members declare {_mib(total)} uncompressed in total, over "
                        f"the {_mib(MAX_NPZ_BYTES)} cap")


def _read_exactly(f, size: int, what: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise DataError(f"{what}: ends inside its .npy header")
    return data


def _npy_header(path, info: zipfile.ZipInfo, f) -> tuple[tuple, bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, header bytes) of a member's .npy header, reading only
    the header; None if the member is not a .npy array at all."""
    what = f"{path}: {info.filename}"
    head = f.read(8)
    if len(head) < 8 or head[:6] != b"\x93NUMPY":
        return None
    version = (head[6], head[7])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise DataError(f"{what}: unsupported .npy format version {version[0]}.{version[1]}")
    size_field = "<H" if version == (1, 0) else "<I"
    length_bytes = _read_exactly(f, struct.calcsize(size_field), what)
    length = struct.unpack(size_field, length_bytes)[0]
    if length > MAX_NPY_HEADER:
        raise DataError(f"{what}: .npy header of {length} bytes; at most {MAX_NPY_HEADER}")
    header = io.BytesIO(length_bytes + _read_exactly(f, length, what))
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(header, max_header_size=MAX_NPY_HEADER)
    return shape, fortran, dtype, 8 + len(length_bytes) + length


def _check_array(path, info: zipfile.ZipInfo, shape, dtype: np.dtype, header: int) -> int:
    """The array's byte count, once its header's claims fit the caps and the zip entry."""
    what = f"{path}: {info.filename}"
    if dtype.hasobject:
        raise DataError(f"{path}: holds object arrays; refused (never unpickled)")
    if dtype.kind not in PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"{what} has dtype {dtype}; only plain numeric arrays are read")
    described = f"{'×'.join(map(str, shape)) or 'scalar'} {dtype}"
    if any(dim < 0 for dim in shape):
        raise DataError(f"{what} claims a negative size: {described}")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > MAX_NPZ_BYTES:
        raise DataError(f"{what} claims {described} = {_mib(claimed)}, over the "
                        f"{_mib(MAX_NPZ_BYTES)} cap")
    if header + claimed != info.file_size:
        raise DataError(f"{what} claims {described} = {header + claimed} bytes with its "
                        f"header, but the zip entry declares {info.file_size}")
    return claimed


def _read_body(f, shape, fortran: bool, dtype: np.dtype, size: int, what: str) -> np.ndarray:
    """Inflate exactly `size` bytes a chunk at a time into one buffer: memory never exceeds
    the array itself, whatever the compressed stream would inflate to."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        block = f.read(min(CHUNK, size - filled))
        if not block:
            raise DataError(f"{what}: ends after {filled} of its {size} data bytes")
        view[filled : filled + len(block)] = block
        filled += len(block)
    if f.read(1):  # also makes zipfile check the member's CRC-32
        raise DataError(f"{what}: holds more than its header declares")
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def _member_keys(path, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """The arrays' names as np.load gives them ("x_train.npy" -> "x_train")."""
    members = {}
    for info in infos:
        name = info.filename
        key = name[: -len(".npy")] if name.endswith(".npy") else name
        if key in members:
            raise DataError(f"{path}: {key} appears twice")
        members[key] = info
    return members


def load_npz(path, expected_keys, only=None) -> dict[str, np.ndarray]:
    """Load an .npz's arrays (all, or `only` some) without ever unpickling anything.

    The file must hold exactly `expected_keys`, each a plain numeric .npy array; object
    arrays are refused. Every size the file declares (zip directory, .npy headers) is
    checked against the caps above before any array data is read, and no member is ever
    inflated past the size it declares, so a hostile file costs bounded memory and time.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head in ZIP_MAGIC:
                _check_directory(path, f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err})") from None
    if head not in ZIP_MAGIC:
        # np.load would take anything else for a .npy or a pickle: refuse it here.
        raise DataError(f"{path}: not an .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _check_sizes(path, infos)
            members = _member_keys(path, infos)
            keys = set(members)
            if keys != set(expected_keys):
                missing = sorted(set(expected_keys) - keys)
                extra = sorted(keys - set(expected_keys))
                raise DataError(
                    f"{path}: wrong arrays (missing: {missing or 'none'}, "
                    f"unexpected: {extra or 'none'})"
                )
            wanted = list(only or expected_keys)
            # Every header first: a bad claim anywhere is refused before any data is read.
            plans = {}
            for key in wanted:
                info = members[key]
                with archive.open(info) as f:
                    found = _npy_header(path, info, f)
                if found is None:
                    raise DataError(f"{path}: {key} is not a .npy array")
                shape, fortran, dtype, header = found
                plans[key] = (shape, fortran, dtype, header,
                              _check_array(path, info, shape, dtype, header))
            arrays = {}
            for key, (shape, fortran, dtype, header, size) in plans.items():
                with archive.open(members[key]) as f:
                    f.read(header)
                    arrays[key] = _read_body(f, shape, fortran, dtype, size,
                                             f"{path}: {members[key].filename}")
            return arrays
    except DataError:
        raise
    except zipfile.BadZipFile as err:
        raise DataError(f"{path}: damaged or truncated zip archive ({err})") from None
    except (ValueError, SyntaxError) as err:  # a malformed .npy header
        raise DataError(f"{path}: unreadable .npz ({one_line(err)})") from None
    except (OSError, EOFError, zlib.error, NotImplementedError) as err:
        raise DataError(f"{path}: unreadable .npz ({err})") from None
