"""Output: ffmpeg encoding of shots, the joined film, probing, and contact sheets."""

from skyray.output.contact_sheet import contact_sheet
from skyray.output.encode import ShotEncoder, VideoInfo, concat, ffmpeg_exe, probe, read_frames

__all__ = ["ShotEncoder", "VideoInfo", "concat", "contact_sheet", "ffmpeg_exe", "probe", "read_frames"]
