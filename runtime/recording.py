"""Recorded observations: rosbag2 MCAP files of the policy node's input topics.

One format for every source: `ros2 bag record` on a robot, the policy node's `record_observations`
parameter, and the LIBERO bridge (`eval-libero --record`) all give an MCAP file with ROS 2 messages
(cdr) on the node's topics:
    [<namespace>/]camera/<name>/image_raw   sensor_msgs/msg/Image (rgb8 or bgr8)
    [<namespace>/]joint_states              sensor_msgs/msg/JointState (position)
    [<namespace>/]instruction               std_msgs/msg/String
`read_observations` turns such a file back into Observations (what FP8 calibration and the accuracy
gates consume). Writing needs no ROS installation: the message definitions are given below, as
rosbag2 stores them (the top definition, then each dependency after a `MSG:` separator).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..nodes.conversions import image_to_rgb, state_vector
from .types import Observation

log = logging.getLogger(__name__)

IMAGE_TOPIC = "camera/{}/image_raw"
STATE_TOPIC = "joint_states"
INSTRUCTION_TOPIC = "instruction"

_SEPARATOR = "\n" + "=" * 80 + "\n"
_TIME = "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec"
_HEADER = "MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id"
MSG_DEFINITIONS = {
    "sensor_msgs/msg/Image": _SEPARATOR.join(
        [
            "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\n"
            "uint32 step\nuint8[] data",
            _HEADER,
            _TIME,
        ]
    ),
    "sensor_msgs/msg/JointState": _SEPARATOR.join(
        [
            "std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\nfloat64[] effort",
            _HEADER,
            _TIME,
        ]
    ),
    "std_msgs/msg/String": "string data",
}


def _stamp(seconds: float) -> dict:
    sec = int(np.floor(seconds))
    return {"sec": sec, "nanosec": int(round((seconds - sec) * 1e9)) % 1_000_000_000}


def refuse_existing_recording(path: str | Path) -> None:
    """A recording is never overwritten (as `ros2 bag record` refuses an existing output): a command
    checks this before it starts anything."""
    if Path(path).exists():
        raise ValueError(f"record: {path} exists; give a path that does not")


class ObservationRecorder:
    """Appends Observations to an MCAP file as the node's input messages. Use as a context manager."""

    def __init__(self, path: str | Path, namespace: str = ""):
        try:
            from mcap_ros2.writer import Writer
        except ImportError:
            raise ValueError(
                "record: needs the mcap and mcap-ros2-support packages (requirements.txt)"
            ) from None
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # "x": a recording is never overwritten (as `ros2 bag record` refuses an existing output)
            self._file = open(self.path, "xb")  # noqa: SIM115 - closed by close()
        except FileExistsError:  # made between the command's check and here
            refuse_existing_recording(self.path)
            raise
        except OSError as err:
            raise ValueError(f"record: cannot write {self.path}: {err.strerror}") from None
        self._writer = Writer(self._file)
        self._schemas = {
            name: self._writer.register_msgdef(name, text) for name, text in MSG_DEFINITIONS.items()
        }
        self._prefix = namespace.strip("/") + "/" if namespace.strip("/") else ""
        self.frames = 0

    def write(self, obs: Observation) -> None:
        t_ns = int(obs.timestamp * 1e9)
        header = {"stamp": _stamp(obs.timestamp), "frame_id": ""}
        # State and instruction first: a reader completes the observation with its last image.
        state = {
            "header": header,
            "name": [],
            "position": [float(v) for v in obs.state],
            "velocity": [],
            "effort": [],
        }
        self._put(STATE_TOPIC, "sensor_msgs/msg/JointState", state, t_ns)
        self._put(INSTRUCTION_TOPIC, "std_msgs/msg/String", {"data": obs.instruction}, t_ns)
        for name, rgb in obs.images.items():
            h, w = rgb.shape[:2]
            image = {
                "header": header,
                "height": h,
                "width": w,
                "encoding": "rgb8",
                "is_bigendian": 0,
                "step": w * 3,
                "data": np.ascontiguousarray(rgb, dtype=np.uint8).tobytes(),
            }
            self._put(IMAGE_TOPIC.format(name), "sensor_msgs/msg/Image", image, t_ns)
        self.frames += 1

    def _put(self, topic: str, schema: str, message: dict, t_ns: int) -> None:
        self._writer.write_message("/" + self._prefix + topic, self._schemas[schema], message, t_ns, t_ns)

    def close(self) -> None:
        if self._file is not None:
            self._writer.finish()
            self._file.close()
            self._file = None
            log.info("recorded %d observations to %s", self.frames, self.path)

    def __enter__(self) -> ObservationRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_observations(
    path: str | Path, cameras: tuple[str, ...], state_dim: int, max_frames: int | None = None
) -> list[Observation]:
    """The observations in a recording, in time order, assembled as the node assembles them: the newest
    image of every camera the file holds, state and instruction; one observation each time every
    recorded camera has published again. Topics match by suffix, so any namespace works. A recording
    whose writer never finished (its process was killed) is read up to where it was cut, with a warning
    that says so."""
    try:
        from mcap.reader import NonSeekingReader, make_reader
        from mcap_ros2.decoder import DecoderFactory
    except ImportError:
        raise ValueError(
            "observations: reading MCAP needs mcap and mcap-ros2-support (requirements.txt)"
        ) from None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"observations: no file at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"observations: cannot read {path} as an MCAP recording: the file is empty")
    decoders = [DecoderFactory()]
    try:
        with open(path, "rb") as f:
            try:
                summary = make_reader(f, decoder_factories=decoders).get_summary()
            except Exception:  # noqa: BLE001 - no readable summary: read the records as they come, below
                summary = None
            if summary is not None:
                topics = {c.topic for c in summary.channels.values()}
                reader = make_reader(f, decoder_factories=decoders)
                return _assemble(reader.iter_decoded_messages(), path, topics, cameras, state_dim, max_frames)
        # The summary is written last: a recorder that did not finish left none, and the file may end in
        # half a record. Read from the start to the cut: once for the topics, once for the observations.
        damage: list[Exception] = []
        with open(path, "rb") as f:
            records = NonSeekingReader(f).iter_messages(log_time_order=False)  # as written, to the cut
            topics = {channel.topic for _, channel, _ in _until_damaged(records, damage)}
        if damage and not topics:
            why = _why(damage[0])
            raise ValueError(
                f"observations: cannot read {path} as an MCAP recording: {why}, before any message"
            )
        with open(path, "rb") as f:
            reader = NonSeekingReader(f, decoder_factories=decoders)
            # (a message that cannot be decoded ends the reading too, and is reported as the cut)
            messages = _until_damaged(reader.iter_decoded_messages(log_time_order=False), damage)
            try:
                observations = _assemble(messages, path, topics, cameras, state_dim, max_frames)
            except ValueError as err:
                cut = f"; the rest cannot be read ({_why(damage[-1])})" if damage else ""
                raise ValueError(f"{err}{cut}") from None
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file, named
        raise ValueError(f"observations: cannot read {path} as an MCAP recording: {_why(err)}") from None
    cut = f"ends in a damaged record: {_why(damage[-1])}" if damage else "has no summary"
    log.warning(
        "observations: %s was not finished by its writer (it %s: a recorder that was stopped by force?); "
        "read the %d observations before the cut",
        path,
        cut,
        len(observations),
    )
    return observations


def _why(err: Exception) -> str:
    return str(err) or type(err).__name__


def _until_damaged(records, damage: list):
    """`records` up to the first that cannot be read; that error is appended to `damage`."""
    try:
        yield from records
    except Exception as err:  # noqa: BLE001 - the damaged end of a recording, reported by the caller
        damage.append(err)


def _assemble(
    messages, path: Path, topics: set[str], cameras: tuple[str, ...], state_dim: int, max_frames: int | None
) -> list[Observation]:
    camera_of = {t: c for t in topics for c in cameras if t.endswith("/" + IMAGE_TOPIC.format(c))}
    if not camera_of:
        raise ValueError(
            f"observations: {path} has no camera topic of this model "
            f"({', '.join(IMAGE_TOPIC.format(c) for c in cameras)})"
        )
    recorded = set(camera_of.values())
    images: dict[str, np.ndarray] = {}
    fresh: set[str] = set()
    state = instruction = None
    out: list[Observation] = []
    for _, channel, _, msg in messages:
        topic = channel.topic
        if topic in camera_of:
            images[camera_of[topic]] = image_to_rgb(msg)
            fresh.add(camera_of[topic])
        elif topic.endswith("/" + STATE_TOPIC):
            values = msg.position if hasattr(msg, "position") else msg.data
            state = state_vector(list(values), state_dim, f"{topic} position")  # as the node: no cutting
        elif topic.endswith("/" + INSTRUCTION_TOPIC):
            instruction = msg.data
        if fresh == recorded and state is not None and instruction:
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9 if hasattr(msg, "header") else 0.0
            out.append(Observation(dict(images), state.copy(), instruction, stamp))
            fresh = set()
            if max_frames is not None and len(out) >= max_frames:
                break
    if not out:
        raise ValueError(
            f"observations: no complete observation (cameras, {STATE_TOPIC}, {INSTRUCTION_TOPIC})"
        )
    return out
