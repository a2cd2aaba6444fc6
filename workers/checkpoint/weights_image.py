"""A snapshot of the weights laid out as the bytes of ``model.safetensors``, in host memory.

The snapshot copies each tensor straight into its place in this image, in memory allocated
once and reused, so that saving costs the loop one memory copy and writing the file is one
sequential write of one buffer. On a local disk that write uses O_DIRECT: the disk reads the
bytes from this buffer (DMA) instead of the CPU copying them into the page cache, which here
cost 20-200 ms of CPU per 100 MB (depending on how hard the kernel must work to find free
pages) against about 3 ms. The write then does not compete with training for the CPU.
Filesystems that refuse O_DIRECT (tmpfs, some network filesystems) get an ordinary write.

The layout is safetensors' own (an 8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the tensors' bytes back to back, as
``safetensors.torch.load_file`` reads them).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import torch

from workers.files import atomic_path

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
ALIGN = 4096  # O_DIRECT: buffer address and write length in whole blocks


def _signature(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple]]:
    return sorted((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())


class WeightsImage:
    """The file ``model.safetensors`` for tensors of these names, dtypes and shapes."""

    def __init__(self, tensors: dict[str, torch.Tensor], pin: bool = False) -> None:
        # Largest elements first: every tensor's offset is then a multiple of its element
        # size, so each one can be a typed view into the byte buffer.
        order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
        header, offsets, end = {}, {}, 0
        for name in order:
            t = tensors[name]
            size = t.numel() * t.element_size()
            header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [end, end + size]}
            offsets[name] = (end, end + size)
            end += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        start = 8 + len(head)
        self.size = start + end  # the file's length
        padded = -(-self.size // ALIGN) * ALIGN
        raw = torch.zeros(padded + ALIGN, dtype=torch.uint8, pin_memory=pin)
        shift = -raw.data_ptr() % ALIGN
        self.buffer = raw[shift:shift + padded]  # block-aligned, whole blocks long
        self.buffer[:8] = torch.tensor(list(len(head).to_bytes(8, "little")), dtype=torch.uint8)
        self.buffer[8:start] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self.views = {
            name: self.buffer[start + a:start + b].view(tensors[name].dtype)
            .view(tensors[name].shape)
            for name, (a, b) in offsets.items()
        }
        self._signature = _signature(tensors)

    @staticmethod
    def supports(tensors: dict[str, torch.Tensor]) -> bool:
        return sys.byteorder == "little" and all(t.dtype in DTYPES for t in tensors.values())

    def fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        return self._signature == _signature(tensors)

    def copy_from(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.views[name].copy_(tensor.detach())  # synchronous, also from a GPU

    def file_bytes(self) -> memoryview:
        return self.buffer.numpy().data[:self.size]

    def write(self, path: Path) -> None:
        """Atomically (``workers.files.atomic_path``), with O_DIRECT where the filesystem
        allows it."""
        with atomic_path(path) as tmp:
            if not self._write_direct(tmp):
                with open(tmp, "wb") as f:
                    f.write(self.file_bytes())

    def _write_direct(self, tmp: str) -> bool:
        """Write with O_DIRECT; False where the filesystem refuses it."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | flag)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        try:
            view = self.buffer.numpy().data
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.ftruncate(fd, self.size)  # the padding to a whole block goes
            return True
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        finally:
            os.close(fd)
