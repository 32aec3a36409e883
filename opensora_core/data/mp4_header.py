"""Read an MP4/MOV's video facts from its index (moov) alone, as PyAV would report them.

PyAV's open runs FFmpeg's find_stream_info, which starts a decoder and decodes the first frame (~4 ms a
file); a scan needs only the index: frame count and durations (stts), timescale (mdhd), codec and size
(stsd, checked against the codec's own sequence header), and where each sample lies (stsc/stsz/stco).
Every value is computed the way FFmpeg's mov demuxer computes it. A file this reader does not fully
understand (fragmented, several video tracks, edit lists beyond one plain edit, other codecs, an index
pointing past the end of the file, odd values) gets None, and the caller asks PyAV instead.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate, pairwise
from pathlib import Path

# FFmpeg's name of its mov/mp4 demuxer, which PyAV reports as the container format.
MP4_CONTAINER = "mov,mp4,m4a,3gp,3g2,mj2"

# Sample entry four-character codes -> the decoder name PyAV reports. Only codecs whose frame size can
# be checked against their sequence header are here: FFmpeg takes the size from that header.
VIDEO_CODECS = {b"avc1": "h264", b"avc3": "h264", b"hvc1": "hevc", b"hev1": "hevc", b"mp4v": "mpeg4"}
# Tracks that FFmpeg never turns into a video stream: sound (by handler), and these sample entries.
NON_VIDEO_ENTRIES = {b"tmcd", b"tx3g", b"text", b"wvtt", b"c608", b"mp4s"}

INT_MAX = 2**31 - 1  # FFmpeg reduces frame rates to fractions whose terms fit an int


@dataclass(frozen=True)
class Mp4Video:
    """The fields of a MediaInfo that the index gives, equal to PyAV's for the same file."""

    num_frames: int
    height: int
    width: int
    fps: float
    duration: float
    codec: str


class _Unsupported(Exception):
    """Something this reader does not handle; the caller falls back to PyAV."""


def read_mp4_video(path: Path | str, file_size: int) -> Mp4Video | None:
    """The video facts of an MP4/MOV whose first box is `ftyp`, or None when PyAV must decide."""
    try:
        with open(path, "rb") as f:
            moov = _read_moov(f, file_size)
        return _video_of(moov, file_size)
    # A malformed box shows up as any of these; none of them is ours to report.
    except (_Unsupported, struct.error, IndexError, ValueError, OverflowError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# boxes


def _read_moov(f, file_size: int) -> bytes:
    """The payload of the first top-level moov, found by seeking from box to box."""
    offset, first = 0, True
    while offset + 8 <= file_size:
        f.seek(offset)
        head = f.read(16)
        size, kind = struct.unpack(">I4s", head[:8])
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", head[8:16])
            header = 16
        elif size == 0:
            size = file_size - offset
        if first and kind != b"ftyp":
            raise _Unsupported("not an ISO BMFF file")
        first = False
        if size < header or offset + size > file_size:
            raise _Unsupported(f"box {kind!r} runs past the end of the file")
        if kind == b"moov":
            f.seek(offset + header)
            return f.read(size - header)
        if kind == b"moof":
            raise _Unsupported("fragmented")
        offset += size
    raise _Unsupported("no moov")


def _children(buf: bytes, start: int = 0, end: int | None = None) -> dict[bytes, list[memoryview]]:
    """The boxes inside buf[start:end] by type, each as its payload."""
    end = len(buf) if end is None else end
    view = memoryview(buf)
    found: dict[bytes, list[memoryview]] = {}
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, offset)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", buf, offset + 8)
            header = 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            raise _Unsupported(f"box {kind!r} overruns its parent")
        found.setdefault(kind, []).append(view[offset + header : offset + size])
        offset += size
    return found


def _one(boxes: dict[bytes, list[memoryview]], kind: bytes) -> memoryview:
    """The single box of this type; none or several is not a layout we read."""
    found = boxes.get(kind, [])
    if len(found) != 1:
        raise _Unsupported(f"{len(found)} {kind!r} boxes")
    return found[0]


def _full_box(payload: memoryview) -> tuple[int, memoryview]:
    """(version, body) of a FullBox payload (version byte and 24 flag bits first)."""
    return payload[0], payload[4:]


def _path(boxes: dict[bytes, list[memoryview]], *kinds: bytes) -> memoryview:
    box = _one(boxes, kinds[0])
    for kind in kinds[1:]:
        box = _one(_children(box), kind)
    return box


# ---------------------------------------------------------------------------------------------
# tracks


@dataclass
class _Track:
    handler: bytes
    entry: bytes  # the sample entry's four-character code
    boxes: dict[bytes, list[memoryview]]  # children of trak
    stbl: dict[bytes, list[memoryview]]


def _video_of(moov: bytes, file_size: int) -> Mp4Video:
    boxes = _children(moov)
    if b"mvex" in boxes:
        raise _Unsupported("fragmented")
    tracks = [_track(trak) for trak in boxes.get(b"trak", [])]
    videos = [t for t in tracks if t.handler == b"vide"]
    if len(videos) != 1:
        raise _Unsupported(f"{len(videos)} video tracks")
    for track in tracks:
        if track.handler not in (b"vide", b"soun") and track.entry not in NON_VIDEO_ENTRIES:
            raise _Unsupported("a track FFmpeg may read as video")  # FFmpeg types tracks by codec too
        # PyAV reads the last video packet to find truncated files; its read never fails when every
        # sample of every track lies inside the file. Otherwise PyAV says what is wrong.
        _check_samples_inside(track, file_size)
    video = videos[0]
    codec = VIDEO_CODECS.get(video.entry)
    if codec is None:
        raise _Unsupported(f"sample entry {video.entry!r}")
    width, height = _frame_size(video, codec)

    version, mdhd = _full_box(_path(video.boxes, b"mdia", b"mdhd"))
    timescale, media_duration = struct.unpack_from(
        ">IQ" if version == 1 else ">II", mdhd, 16 if version else 8
    )
    if timescale == 0 or media_duration in (0, 2**32 - 1, 2**64 - 1):
        raise _Unsupported("no timescale or duration in mdhd")
    num_frames, stts_duration = _stts_totals(_one(video.stbl, b"stts"))
    if num_frames <= 0 or stts_duration <= 0 or num_frames != _sample_count(video.stbl):
        raise _Unsupported("stts empty or disagreeing with stsz")
    if _has_negative_offsets(video.stbl):
        raise _Unsupported("negative composition offsets")  # FFmpeg shifts every timestamp then
    # FFmpeg: the stream lasts the shorter of mdhd and the stts sum, and no longer than its edit.
    duration = min(media_duration, stts_duration)
    edit = _single_edit_duration(video.boxes, boxes, timescale)
    if edit is not None:
        duration = min(duration, edit)
    fps = Fraction(timescale * num_frames, stts_duration)
    if fps.numerator > INT_MAX or fps.denominator > INT_MAX:
        raise _Unsupported(f"frame rate {fps}")  # FFmpeg would approximate it
    return Mp4Video(
        num_frames=num_frames,
        height=height,
        width=width,
        fps=float(fps),
        duration=float(Fraction(duration, timescale)),
        codec=codec,
    )


def _track(trak: memoryview) -> _Track:
    boxes = _children(trak)
    mdia = _children(_one(boxes, b"mdia"))
    _, hdlr = _full_box(_one(mdia, b"hdlr"))
    handler = bytes(hdlr[4:8])
    minf = _children(_one(mdia, b"minf"))
    _, dref = _full_box(_path(minf, b"dinf", b"dref"))
    for entries in _children(dref, 4).values():
        if any(not (e[3] & 1) for e in entries):  # flag 1: the data is in this file
            raise _Unsupported("samples in another file")
    stbl = _children(_one(minf, b"stbl"))
    _, stsd = _full_box(_one(stbl, b"stsd"))
    (count,) = struct.unpack_from(">I", stsd)
    entries = _children(stsd, 4)
    if count != 1 or sum(len(v) for v in entries.values()) != 1:
        raise _Unsupported("not one sample description")
    (entry,) = entries
    return _Track(handler, entry, boxes, stbl)


def _stts_totals(payload: memoryview) -> tuple[int, int]:
    """(samples, duration) summed over the time-to-sample table."""
    _, body = _full_box(payload)
    (n,) = struct.unpack_from(">I", body)
    table = _u32_array(body[4 : 4 + 8 * n], 2 * n)
    counts, deltas = table[0::2], table[1::2]
    if any(d >= 2**31 for d in deltas):
        raise _Unsupported("stts delta FFmpeg would clip")
    return sum(counts), sum(c * d for c, d in zip(counts, deltas, strict=True))


def _has_negative_offsets(stbl: dict[bytes, list[memoryview]]) -> bool:
    if b"ctts" not in stbl:
        return False
    _, body = _full_box(_one(stbl, b"ctts"))
    (n,) = struct.unpack_from(">I", body)
    offsets = _u32_array(body[4 : 4 + 8 * n], 2 * n)[1::2]
    return any(o >= 2**31 for o in offsets)  # FFmpeg reads them as signed, whatever the version says


def _single_edit_duration(trak: dict, moov: dict, timescale: int) -> int | None:
    """The one plain edit's length in track units (as FFmpeg rescales it), None without an edit list."""
    if b"edts" not in trak:
        return None
    edts = _children(_one(trak, b"edts"))
    if b"elst" not in edts:
        return None
    version, body = _full_box(_one(edts, b"elst"))
    (n,) = struct.unpack_from(">I", body)
    if n != 1:
        raise _Unsupported(f"{n} edits")
    if version == 1:
        segment, media_time, rate = struct.unpack_from(">QqI", body, 4)
    else:
        segment, media_time, rate = struct.unpack_from(">IiI", body, 4)
    if media_time < 0 or rate != 0x10000 or segment == 0:
        raise _Unsupported("an edit that moves or skips media")
    movie_scale = _movie_timescale(_one(moov, b"mvhd"))
    if movie_scale == 0:
        raise _Unsupported("no movie timescale")
    return (segment * timescale + movie_scale // 2) // movie_scale  # av_rescale rounds half up


def _movie_timescale(payload: memoryview) -> int:
    version, body = _full_box(payload)
    (scale,) = struct.unpack_from(">I", body, 16 if version == 1 else 8)
    return scale


def _sample_count(stbl: dict[bytes, list[memoryview]]) -> int:
    _, stsz = _full_box(_one(stbl, b"stsz"))
    return struct.unpack_from(">I", stsz, 4)[0]


def _check_samples_inside(track: _Track, file_size: int) -> None:
    """Raise unless every sample's bytes lie inside the file (sizes from stsz, places from stsc + stco)."""
    stbl = track.stbl
    _, stsz = _full_box(_one(stbl, b"stsz"))
    size, count = struct.unpack_from(">II", stsz)
    sizes = [size] * count if size else _u32_array(stsz[8 : 8 + 4 * count], count)
    if track.handler == b"vide" and (count == 0 or min(sizes) == 0):
        raise _Unsupported("empty video samples")  # PyAV skips them; let it
    if track.handler != b"vide" and size:
        raise _Unsupported("constant sample size")  # QuickTime PCM: sizes in frames, not bytes
    if b"co64" in stbl:
        if b"stco" in stbl:
            raise _Unsupported("both stco and co64")
        _, co = _full_box(_one(stbl, b"co64"))
        (n,) = struct.unpack_from(">I", co)
        offsets = list(struct.unpack_from(f">{n}Q", co, 4))
    else:
        _, co = _full_box(_one(stbl, b"stco"))
        (n,) = struct.unpack_from(">I", co)
        offsets = list(_u32_array(co[4 : 4 + 4 * n], n))
    _, stsc = _full_box(_one(stbl, b"stsc"))
    (runs,) = struct.unpack_from(">I", stsc)
    table = _u32_array(stsc[4 : 4 + 12 * runs], 3 * runs)
    firsts, per_chunk, descriptions = table[0::3], table[1::3], table[2::3]
    if (runs == 0) != (count == 0) or (runs and firsts[0] != 1):
        raise _Unsupported("stsc does not start at chunk 1")
    if any(d != 1 for d in descriptions) or any(p == 0 for p in per_chunk):
        raise _Unsupported("odd stsc")
    if any(b <= a for a, b in pairwise(firsts)) or (runs and firsts[-1] > len(offsets)):
        raise _Unsupported("stsc chunks out of order")
    ends = [0, *accumulate(sizes)]
    sample = 0
    for run, first in enumerate(firsts):
        last = firsts[run + 1] - 1 if run + 1 < runs else len(offsets)
        for chunk in range(first - 1, last):
            step = per_chunk[run]
            if sample + step > count or offsets[chunk] + ends[sample + step] - ends[sample] > file_size:
                raise _Unsupported("a sample lies past the end of the file")
            sample += step
    if sample != count:
        raise _Unsupported("stsc and stsz disagree on the sample count")


def _u32_array(data: memoryview, n: int) -> array:
    values = array("I", bytes(data))
    if len(values) != n:
        raise _Unsupported("table shorter than its count")
    if values.itemsize != 4:
        raise _Unsupported("no 32-bit array type")
    if array("I", [1]).tobytes()[0] == 1:  # little-endian machine: the file is big-endian
        values.byteswap()
    return values


# ---------------------------------------------------------------------------------------------
# frame size: the sample entry's, when the codec's sequence header agrees


def _frame_size(track: _Track, codec: str) -> tuple[int, int]:
    """(width, height) of the video sample entry, checked against the SPS / VOL header that FFmpeg's
    decoder takes the size from (its cropping quirks apply to left/top crops: those fall back)."""
    entry = _one(_children(_one(track.stbl, b"stsd"), 8), track.entry)
    width, height = struct.unpack_from(">HH", entry, 24)
    extensions = _children(entry, 78)
    if codec == "h264":
        header = _h264_size(_single_parameter_set(_one(extensions, b"avcC"), hevc=False))
    elif codec == "hevc":
        header = _hevc_size(_single_parameter_set(_one(extensions, b"hvcC"), hevc=True))
    else:
        header = _mpeg4_size(_one(extensions, b"esds"))
    if header != (width, height):
        raise _Unsupported(f"sample entry says {width}x{height}, the stream header {header}")
    return width, height


def _single_parameter_set(config: memoryview, *, hevc: bool) -> bytes:
    """The one SPS NAL unit of an avcC / hvcC record, without emulation-prevention bytes."""
    if hevc:
        offset, sps = 23, []
        (arrays,) = struct.unpack_from(">B", config, 22)
        for _ in range(arrays):
            nal_type, n = config[offset] & 0x3F, struct.unpack_from(">H", config, offset + 1)[0]
            offset += 3
            for _ in range(n):
                (length,) = struct.unpack_from(">H", config, offset)
                if nal_type == 33:
                    sps.append(bytes(config[offset + 2 : offset + 2 + length]))
                offset += 2 + length
    else:
        n = config[5] & 0x1F
        offset, sps = 6, []
        for _ in range(n):
            (length,) = struct.unpack_from(">H", config, offset)
            sps.append(bytes(config[offset + 2 : offset + 2 + length]))
            offset += 2 + length
    if len(sps) != 1:
        raise _Unsupported(f"{len(sps)} SPS in the decoder configuration")
    return sps[0].replace(b"\x00\x00\x03", b"\x00\x00")


class _Bits:
    """Big-endian bit reader with Exp-Golomb codes (H.264/H.265 headers)."""

    def __init__(self, data: bytes) -> None:
        self.value, self.size, self.pos = int.from_bytes(data, "big"), 8 * len(data), 0

    def u(self, n: int) -> int:
        if self.pos + n > self.size:
            raise _Unsupported("header ends early")
        self.pos += n
        return (self.value >> (self.size - self.pos)) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise _Unsupported("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def _h264_size(sps: bytes) -> tuple[int, int]:
    """Cropped (width, height) from an H.264 SPS (ITU-T H.264 7.3.2.1.1)."""
    bits = _Bits(sps[1:])  # past the NAL header
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    chroma = 1
    if profile in HIGH_PROFILES:
        chroma = bits.ue()
        if chroma == 3:
            bits.u(1)  # separate_colour_plane_flag
        bits.ue(), bits.ue(), bits.u(1)  # bit depths, qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if bits.u(1):
                    last = next_ = 8
                    for _ in range(16 if i < 6 else 64):
                        if next_:
                            next_ = (last + bits.se() + 256) % 256
                        last = next_ or last
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.u(1), bits.se(), bits.se()
        for _ in range(bits.ue()):
            bits.se()
    bits.ue(), bits.u(1)  # max_num_ref_frames, gaps_in_frame_num_value_allowed_flag
    width_mbs, height_units = bits.ue() + 1, bits.ue() + 1
    if not bits.u(1):  # frame_mbs_only_flag
        raise _Unsupported("interlaced H.264")
    bits.u(1)  # direct_8x8_inference_flag
    return _cropped(bits, chroma, 16 * width_mbs, 16 * height_units)  # frame_cropping_flag and offsets


def _hevc_size(sps: bytes) -> tuple[int, int]:
    """Cropped (width, height) from an H.265 SPS (ITU-T H.265 7.3.2.2)."""
    bits = _Bits(sps[2:])  # past the two-byte NAL header
    bits.u(4)  # sps_video_parameter_set_id
    sub_layers = bits.u(3)  # sps_max_sub_layers_minus1
    bits.u(1)
    bits.u(88), bits.u(8)  # general profile, level
    present = [(bits.u(1), bits.u(1)) for _ in range(sub_layers)]
    if sub_layers:
        bits.u(2 * (8 - sub_layers))
    for profile_present, level_present in present:
        bits.u(88 * profile_present + 8 * level_present)
    bits.ue()  # sps_seq_parameter_set_id
    chroma = bits.ue()
    if chroma == 3 and bits.u(1):  # separate_colour_plane_flag
        chroma = 0
    width, height = bits.ue(), bits.ue()
    return _cropped(bits, chroma, width, height)  # conformance_window_flag and offsets


def _cropped(bits: _Bits, chroma: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) after the SPS's crop window: a flag, then left/right/top/bottom offsets in chroma
    sample units (H.264 frame cropping and H.265 conformance window are coded the same way)."""
    left = right = top = bottom = 0
    if bits.u(1):
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
    if left or top:
        raise _Unsupported("left/top cropping")
    step_x = 2 if chroma in (1, 2) else 1
    step_y = 2 if chroma == 1 else 1
    return width - step_x * right, height - step_y * bottom


def _mpeg4_size(esds: memoryview) -> tuple[int, int]:
    """(width, height) from the MPEG-4 part 2 VOL header in an esds (ISO 14496-2 6.2.3)."""
    _, body = _full_box(esds)
    tag, offset = _descriptor(body, 0)
    if tag != 0x03:
        raise _Unsupported("no ES descriptor")
    flags = body[offset + 2]  # streamDependence, URL, OCRstream, then priority
    offset += 3 + 2 * (flags >> 7)
    if flags & 0x40:
        offset += 1 + body[offset]
    offset += 2 * ((flags >> 5) & 1)
    tag, offset = _descriptor(body, offset)
    if tag != 0x04 or body[offset] != 0x20:  # object type 0x20: MPEG-4 Visual; others are other codecs
        raise _Unsupported("not MPEG-4 Visual")
    tag, offset = _descriptor(body, offset + 13)
    if tag != 0x05:
        raise _Unsupported("no decoder specific info")
    data = bytes(body[offset:])
    start = next(
        (
            i
            for i in range(len(data) - 3)
            if data[i : i + 3] == b"\x00\x00\x01" and 0x20 <= data[i + 3] <= 0x2F
        ),
        -1,
    )
    if start < 0:
        raise _Unsupported("no VOL header")
    bits = _Bits(data[start + 4 :])
    bits.u(1), bits.u(8)  # random_accessible_vol, video_object_type_indication
    if bits.u(1):  # is_object_layer_identifier: verid, priority
        bits.u(7)
    if bits.u(4) == 15:  # aspect_ratio_info: extended PAR
        bits.u(16)
    if bits.u(1):  # vol_control_parameters
        bits.u(3)  # chroma_format, low_delay
        if bits.u(1):  # vbv_parameters
            bits.u(79)
    shape = bits.u(2)
    if shape != 0:
        raise _Unsupported("non-rectangular VOL")
    bits.u(1)
    resolution = bits.u(16)
    bits.u(1)
    if bits.u(1):  # fixed_vop_rate
        bits.u(max(1, (resolution - 1).bit_length()))
    bits.u(1)
    width = bits.u(13)
    bits.u(1)
    height = bits.u(13)
    return width, height


def _descriptor(body: memoryview, offset: int) -> tuple[int, int]:
    """(tag, offset of its payload) of an MPEG-4 descriptor (length in 7-bit groups)."""
    tag = body[offset]
    offset += 1
    for _ in range(4):
        more = body[offset] & 0x80
        offset += 1
        if not more:
            break
    return tag, offset


__all__ = ["MP4_CONTAINER", "Mp4Video", "read_mp4_video"]
