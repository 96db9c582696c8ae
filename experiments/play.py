"""Play a dream env (or the real one) with the keyboard, in a pygame window; record the session to mp4.

Keys: ↑ forward, ← / → turn (combine with ↑ to move and turn), space attack (Battle2), Tab switch
between dream and real env (same seed), R start/stop recording, Backspace reset, Esc quit. The
world only advances while a move key is held (one step per frame at the env's frame rate).

Examples:
    python experiments/play.py --env vizdoom_hgs
    python experiments/play.py --env vizdoom_hgs --checkpoint runs/vizdoom_hgs-tiny --record session.mp4
    # scripted keys instead of the keyboard (demos, tests; no window needed with SDL_VIDEODRIVER=dummy)
    python experiments/play.py --env vizdoom_hgs --keys "up,up,left,up+right,tab,up" --record s.mp4
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from envs.dream import DreamEnv, load_world_model
from envs.vizdoom import sigterm_exits
from worldmodel.video import annotate, upscale, write_video

# key -> the words of an action name it stands for ("turn_left", "run_forward_right", "attack", ...)
KEY_WORDS = {"up": {"forward"}, "left": {"left"}, "right": {"right"}, "space": {"attack"}}
IGNORED_WORDS = {"turn", "run"}


def action_for_keys(keys: set[str], names: tuple[str, ...]) -> int | None:
    """The discrete action whose name's words are exactly what ``keys`` stand for (None: no such action)."""
    want = set().union(*(KEY_WORDS[k] for k in keys if k in KEY_WORDS)) if keys else set()
    if not want:
        return None
    for i, name in enumerate(names):
        if set(name.split("_")) - IGNORED_WORDS == want:
            return i
    return None


@dataclass
class Args:
    env: str = "vizdoom_hgs"
    """Preset of the bundle (a ViZDoom preset: play needs discrete actions)."""
    checkpoint: str | None = None
    """Bundle directory (default: the newest bundle of --env under runs/ or $WORLDMODEL_HOME/runs)."""
    scale: int = 6
    """Window upscaling factor (nearest)."""
    temperature: float = 1.0
    """Sampling temperature of the dream."""
    seed: int = 0
    """Seed of both envs' resets."""
    record: str | None = None
    """Record the session to this mp4 from the start (R toggles recording)."""
    keys: str | None = None
    """Scripted session instead of the keyboard: comma-separated steps, each key names joined by '+'
    (up, left, right, space) or one of tab / reset; the program exits at the end."""
    battle2_path: str | None = None
    """Directory with D4_battle2.wad/.cfg (real env of vizdoom_battle2) (default: the map shipped with the package)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""


class Session:
    """The two envs (dream, real), the active one, and the recording."""

    def __init__(self, args: Args) -> None:
        from envs.policy import real_env_kwargs
        from envs.real import make_real_env

        wm = load_world_model(args.checkpoint, args.env, args.device)
        spec = wm.action_spec
        if spec.kind != "discrete" or not spec.names:
            raise ValueError(
                f"play needs a bundle with named discrete actions; {wm.path} has {spec.kind} actions"
            )
        self.names = spec.names
        self.dream = DreamEnv(world_model=wm, temperature=args.temperature)
        kw = real_env_kwargs(wm)  # the real env the bundle's data came from (frame skip, health bar)
        if args.battle2_path:
            kw["battle2_path"] = args.battle2_path
        self.real = make_real_env(args.env, resolution=wm.obs_shape[0], **kw)
        self.envs = {"dream": self.dream, "real": self.real}
        self.mode, self.seed, self.fps = "dream", args.seed, wm.fps
        self.obs = {m: e.reset(seed=args.seed)[0] for m, e in self.envs.items()}
        self.info = "reset"
        self.recording = args.record is not None
        self.frames: list[np.ndarray] = []
        self.scale = args.scale

    def view(self) -> np.ndarray:
        frame = annotate(
            upscale(self.obs[self.mode], self.scale),
            [self.mode.upper(), self.info] + (["REC"] if self.recording else []),
        )
        if self.recording:
            self.frames.append(frame)
        return frame

    def press(self, keys: set[str]) -> None:
        if "tab" in keys:
            self.mode = "real" if self.mode == "dream" else "dream"
            self.info = f"switched to {self.mode}"
            return
        env = self.envs[self.mode]
        if "reset" in keys:
            self.obs[self.mode], _ = env.reset()
            self.info = "reset"
            return
        a = action_for_keys(keys, self.names)
        if a is None:
            return
        obs, r, term, trunc, info = env.step(a)
        self.obs[self.mode] = obs
        extra = f" p(term)={info['terminated_prob']:.2f}" if "terminated_prob" in info else ""
        self.info = f"{self.names[a]} r={r:.2f}{extra}"
        if term or trunc:
            self.obs[self.mode], _ = env.reset()
            self.info += " | episode over: reset"

    def save(self, path: str | None) -> Path | None:
        if not path or not self.frames:
            return None
        out = write_video(self.frames, path, fps=self.fps)
        print(f"recorded {len(self.frames)} frames to {out}")
        return out


def run_scripted(s: Session, script: str, record: str | None) -> None:
    for step in script.split(","):
        keys = {k.strip() for k in step.split("+") if k.strip()}
        unknown = keys - set(KEY_WORDS) - {"tab", "reset"}
        if unknown:
            sys.exit(
                f"--keys: unknown key names {sorted(unknown)}; expected up, left, right, space, tab, reset"
            )
        s.view()
        s.press(keys)
    s.view()
    s.save(record)


def run_interactive(s: Session, record: str | None) -> None:
    import pygame

    pygame.display.init()
    first = s.view()
    screen = pygame.display.set_mode((first.shape[1], first.shape[0]))
    pygame.display.set_caption("VideoGPT dream — arrows move, Tab dream/real, R record, Esc quit")
    clock = pygame.time.Clock()
    held = {pygame.K_UP: "up", pygame.K_LEFT: "left", pygame.K_RIGHT: "right", pygame.K_SPACE: "space"}
    record_path = record or "play_session.mp4"
    running = True
    while running:
        events: set[str] = set()
        for ev in pygame.event.get():
            if ev.type == pygame.QUIT or (ev.type == pygame.KEYDOWN and ev.key == pygame.K_ESCAPE):
                running = False
            elif ev.type == pygame.KEYDOWN and ev.key == pygame.K_TAB:
                events.add("tab")
            elif ev.type == pygame.KEYDOWN and ev.key == pygame.K_BACKSPACE:
                events.add("reset")
            elif ev.type == pygame.KEYDOWN and ev.key == pygame.K_r:
                s.recording = not s.recording
                if not s.recording:
                    s.save(record_path)
                    s.frames = []
        pressed = pygame.key.get_pressed()
        keys = events or {name for k, name in held.items() if pressed[k]}
        if keys:
            s.press(keys)
        frame = s.view() if keys else annotate(upscale(s.obs[s.mode], s.scale), [s.mode.upper(), s.info])
        screen.blit(pygame.surfarray.make_surface(frame.swapaxes(0, 1)), (0, 0))
        pygame.display.flip()
        clock.tick(s.fps)
    s.save(record_path)
    pygame.display.quit()


def main(args: Args) -> None:
    sigterm_exits()  # SIGTERM runs the cleanup (every ViZDoom engine closed) instead of killing outright
    try:
        s = Session(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.keys is not None:
        run_scripted(s, args.keys, args.record)
    else:
        if not os.environ.get("DISPLAY") and os.environ.get("SDL_VIDEODRIVER") != "dummy":
            sys.exit(
                "error: no display for the pygame window (set DISPLAY, or use --keys for a scripted session)"
            )
        run_interactive(s, args.record)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
