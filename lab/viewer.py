"""A window that shows RGB frames at a steady rate: ``lab watch --human`` and ``lab explain --human``.

    require_display("record a video instead: lab watch RUN --out FILE.mp4")   # before any work
    with Viewer("lab watch: mario-1-1", fps=15.0) as viewer:                  # 60 / frame skip
        for frame in frames:
            if not viewer.show(frame, caption="ep 1  right+A  V=3.21  x=812"):
                break                                                        # the window was closed

Every env family goes through this one path: the env renders ``rgb_array`` frames, the viewer
enlarges them (nearest neighbour, so the NES pixels stay sharp), draws the caption bar of the
videos at the window's size, and waits on a monotonic clock so that frame ``k`` appears ``k / fps``
seconds after the first. It draws with pygame (SDL2), which the lab already has through MiniGrid,
and never uses an env's own ``"human"`` renderer (nes-py only draws inside ``render()``, and each
family draws differently).
"""

from __future__ import annotations

import math
import os
import sys
import time
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from lab.errors import UsageError

CAPTION_HEIGHT = 22  # the caption bar of the videos, in pixels at scale 1
CAPTION_FONT_SCALE = 0.36
CAPTION_WIDTH = 256  # the width (the NES screen's) that a caption at scale 1 suits
# SDL drivers that draw nowhere a person can see.
INVISIBLE_DRIVERS = ("dummy", "offscreen")
# The longest waits between two looks at the window's events, so that closing it answers at once
# even when a slow --speed shows each frame for seconds.
EVENT_POLL_SECONDS = 0.02
# The automatic scale fills at most this share of the screen, and enlarges at most this much.
SCREEN_SHARE = 0.8
MAX_AUTO_SCALE = 3


class NoDisplayError(UsageError):
    """No window can be opened here (no ``$DISPLAY``, or one that does not answer): exit status 2."""


def add_caption(frame: np.ndarray, text: str, scale: int = 1) -> np.ndarray:
    """Returns the frame with a black caption bar below it: ``(H + 22 * scale, W, 3)`` uint8.

    ``scale`` enlarges the bar and its font with the picture, so a caption drawn on a frame that the
    viewer enlarged stays as crisp as the picture instead of being blown up pixel by pixel.
    """
    height, width = frame.shape[:2]
    canvas = np.zeros((height + CAPTION_HEIGHT * scale, width, 3), dtype=np.uint8)
    canvas[:height] = frame
    cv2.putText(
        canvas,
        text,
        (3 * scale, height + 15 * scale),
        cv2.FONT_HERSHEY_SIMPLEX,
        CAPTION_FONT_SCALE * scale,
        (255, 255, 255),
        max(1, scale // 2),
        cv2.LINE_AA,
    )
    return canvas


def _pygame() -> Any:
    """Imports pygame quietly (pygame-ce prints a banner on import otherwise)."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    return pygame


def _choose_driver() -> None:
    """On X11/Wayland systems, asks SDL for the display the environment names and nothing else.

    Left to itself, SDL falls back from an unreachable X display to the Linux console (KMSDRM), a
    full screen nobody asked for; naming the driver turns that into a plain error instead. A driver
    the user chose with ``SDL_VIDEODRIVER`` is kept.
    """
    if os.environ.get("SDL_VIDEODRIVER") or not sys.platform.startswith(("linux", "freebsd", "openbsd")):
        return
    os.environ["SDL_VIDEODRIVER"] = "x11" if os.environ.get("DISPLAY") else "wayland"


def display_problem() -> str | None:
    """Why no window can be opened here, in a few words; ``None`` when one can.

    Looks at the environment first (``$DISPLAY``, ``$WAYLAND_DISPLAY``, ``SDL_VIDEODRIVER``), then
    opens the display itself, so a ``$DISPLAY`` naming a server that is not there is caught too.
    """
    driver = os.environ.get("SDL_VIDEODRIVER", "")
    if driver in INVISIBLE_DRIVERS:
        return f"SDL_VIDEODRIVER={driver} draws nowhere"
    unix_desktop = sys.platform.startswith(("linux", "freebsd", "openbsd"))
    if (
        unix_desktop
        and not driver
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
    ):
        return "$DISPLAY is not set"
    _choose_driver()
    pygame = _pygame()
    try:
        pygame.display.init()
    except pygame.error as error:
        where = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or "the screen"
        return f"cannot open display {where!r} ({error})"
    if pygame.display.get_driver() in INVISIBLE_DRIVERS:
        return f"only SDL's {pygame.display.get_driver()!r} driver is available"
    return None


def require_display(suggestion: str, command: str = "lab watch --human") -> None:
    """Raises :class:`NoDisplayError` (one line, exit 2) when no window can be opened here.

    Args:
        suggestion: what to do instead, e.g. ``"record a video instead: lab watch RUN --out FILE.mp4"``.
        command: the command named at the start of the message.
    """
    problem = display_problem()
    if problem is not None:
        raise NoDisplayError(f"{command}: no display to open a window on ({problem}); {suggestion}")


class Viewer:
    """A window showing RGB frames at ``fps`` frames per second, enlarged ``scale`` times.

    The window opens with the first frame (its size is the frame's) and follows the frame's size
    if it changes. :meth:`show` returns ``False`` once the window is closed (its close button,
    Escape or Q); the caller then stops. Ctrl-C raises ``KeyboardInterrupt`` as usual, and the
    ``with`` block closes the window on the way out.

    Args:
        title: the window's title.
        fps: frames per second to show; ``math.inf`` shows each frame as soon as it comes.
        scale: integer enlargement; ``None`` picks the largest (at most 3) that fits the screen.

    Attributes:
        frames_drawn: frames shown so far.
        closed: whether the window was closed (by the user or :meth:`close`).
    """

    def __init__(self, title: str, fps: float, scale: int | None = None):
        if not fps > 0:
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if scale is not None and (not isinstance(scale, int) or scale < 1):
            raise ValueError(f"scale must be a positive integer or None, got {scale!r}")
        self.title = title
        self.fps = float(fps)
        self.scale = scale
        self.frames_drawn = 0
        self.closed = False
        self._pygame = _pygame()
        self._screen: Any = None
        self._size: tuple[int, int] | None = None
        self._next_time: float | None = None  # when the next frame is due, on the monotonic clock
        self._first_time: float | None = None
        self._last_time: float | None = None

    @property
    def seconds_shown(self) -> float:
        """Seconds from the first frame drawn to the last one."""
        if self._first_time is None or self._last_time is None:
            return 0.0
        return self._last_time - self._first_time

    def show(self, frame: np.ndarray, caption: str | None = None) -> bool:
        """Waits until the frame is due, then draws it (with ``caption`` in a bar below it).

        Args:
            frame: ``(H, W, 3)`` (or ``(H, W)`` grayscale) uint8 RGB.
            caption: one line of text for the bar below the picture, or ``None`` for no bar.

        Returns:
            ``False`` when the window is closed (nothing is drawn then), else ``True``.
        """
        if self.closed or not self._wait_until_due():
            return False
        picture = self._enlarge(_as_rgb(frame))
        if caption is not None:
            # The caption grows with the picture, and with a wide one too (CartPole is 600 pixels
            # wide at scale 1), so that it stays readable at a glance.
            picture = add_caption(picture, caption, max(self.scale or 1, picture.shape[1] // CAPTION_WIDTH))
        self._draw(picture)
        now = time.monotonic()
        self.frames_drawn += 1
        self._first_time = now if self._first_time is None else self._first_time
        self._last_time = now
        period = 1.0 / self.fps
        due = (self._next_time or now) + period
        # A frame that came late (a slow step, a checkpoint being loaded) restarts the clock rather
        # than letting the frames after it rush to catch up.
        self._next_time = due if due > now else now + period
        return True

    def poll(self) -> bool:
        """Handles the window's pending events; ``False`` once it was closed."""
        if self.closed:
            return False
        if self._screen is None:
            return True
        pygame = self._pygame
        for event in pygame.event.get():
            if event.type == pygame.QUIT or (
                event.type == pygame.KEYDOWN and event.key in (pygame.K_ESCAPE, pygame.K_q)
            ):
                self.close()
                return False
        return True

    def close(self) -> None:
        """Closes the window (nothing happens when it was never opened or is closed already)."""
        if self._screen is not None:
            self._pygame.display.quit()
            self._screen = None
        self.closed = True

    def __enter__(self) -> Viewer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _wait_until_due(self) -> bool:
        """Sleeps until the next frame is due, looking at the window's events meanwhile."""
        while True:
            if not self.poll():
                return False
            remaining = (self._next_time or 0.0) - time.monotonic()
            if remaining <= 0 or math.isinf(self.fps):
                return True
            time.sleep(min(remaining, EVENT_POLL_SECONDS))

    def _enlarge(self, frame: np.ndarray) -> np.ndarray:
        if self.scale is None:
            self.scale = self._auto_scale(frame.shape[0] + CAPTION_HEIGHT, frame.shape[1])
        if self.scale == 1:
            return frame
        height, width = frame.shape[:2]
        return cv2.resize(frame, (width * self.scale, height * self.scale), interpolation=cv2.INTER_NEAREST)

    def _auto_scale(self, height: int, width: int) -> int:
        """The largest enlargement up to ``MAX_AUTO_SCALE`` that fits the screen, at least 1."""
        pygame = self._pygame
        pygame.display.init()
        info = pygame.display.Info()
        screen_w, screen_h = info.current_w, info.current_h
        if screen_w <= 0 or screen_h <= 0:  # the driver does not know the screen's size
            return max(1, min(MAX_AUTO_SCALE, 480 // max(height, width)))
        fits = min(SCREEN_SHARE * screen_w / width, SCREEN_SHARE * screen_h / height)
        return max(1, min(MAX_AUTO_SCALE, int(fits)))

    def _draw(self, picture: np.ndarray) -> None:
        pygame = self._pygame
        height, width = picture.shape[:2]
        if self._screen is None or self._size != (width, height):
            _choose_driver()
            pygame.display.init()
            self._screen = pygame.display.set_mode((width, height))
            pygame.display.set_caption(self.title)
            self._size = (width, height)
        surface = pygame.image.frombuffer(np.ascontiguousarray(picture).tobytes(), (width, height), "RGB")
        self._screen.blit(surface, (0, 0))
        pygame.display.flip()


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be (H, W, 3) or (H, W), got shape {frame.shape}")
    return frame
