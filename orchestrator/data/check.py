"""The data, checked before a study starts Ray: every problem at once, each naming its file.

A broken data set used to surface minutes into a study, inside a Ray worker, as a long traceback
naming one bad file at best. ``check_study_data`` runs first instead: it builds each split's data
set the way training does (the constructors validate the data options and a folder's layout) and
lets a data set that reads files open every one of them, once (``check_files``). The result is a
list of ``DataProblem``: what is wrong, and with which file.

The same readers serve training: a loader raises ``DataError`` (a ``ValueError``) naming the file
whenever a sample cannot be read, so a file that goes bad after the check is reported by name as
that trial's error.

A data set class takes part by defining ``check_files(self) -> list[DataProblem]`` (``FolderDataset``
and ``PhotoInpaintingDataset`` do); a data set that wraps another (``inner`` or ``dataset``, as
SPADE's ``LabelIdDataset`` and torch's ``Subset``) is searched through.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

SPLITS = ("train", "val")
_WRAPPED = ("inner", "dataset")  # attributes under which a wrapping data set keeps the wrapped one

T = TypeVar("T")


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with the data. ``path`` is the file (or folder) at fault, None when the
    problem is a setting (``data.options``, a label count)."""

    path: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DataError(ValueError):
    """Data that cannot be used, naming each file at fault (``problems``; ``path`` is the first).

    ``dataset``, when set, is what could be built despite the problems (e.g. the pairs of a folder
    that did pair up), so a check can go on to read their files; it is not pickled."""

    def __init__(self, problems: DataProblem | str | Iterable[DataProblem], dataset: Any = None):
        if isinstance(problems, DataProblem):
            problems = [problems]
        elif isinstance(problems, str):
            problems = [DataProblem(None, problems)]
        self.problems: list[DataProblem] = list(problems)
        self.dataset = dataset
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def path(self) -> str | None:
        return next((p.path for p in self.problems if p.path), None)

    def __reduce__(self):  # Ray ships exceptions between processes
        return (DataError, (self.problems,))


def file_problem(path: str | os.PathLike, message: str) -> DataProblem:
    return DataProblem(str(path), message)


# --------------------------------------------------------------------------- reading images

def open_image(path: str | os.PathLike):
    """The fully decoded PIL image at ``path`` (its file closed); ``DataError`` naming the file when
    it is not a readable image (not an image at all, truncated, corrupt)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(file_problem(path, "not a readable image (an unknown format, or a damaged file)")) from None
    except OSError as error:
        raise DataError(file_problem(path, f"cannot be opened: {error.strerror or error}")) from None
    try:
        img.load()  # decodes everything, and closes the file of a single-frame image
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for broken files
        img.close()
        raise DataError(file_problem(path, f"not a readable image ({_detail(error, path)})")) from None
    return img


def _detail(error: Exception, path: str | os.PathLike) -> str:
    text = str(error).replace(repr(str(path)), "").replace(str(path), "").strip(" :") or "no detail"
    return f"{type(error).__name__}: {text}"


# 16/32-bit integer and float images are id or depth maps, not photos: convert("RGB") would clip them
_NOT_PHOTO_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def photo_mode_problem(img, path: str | os.PathLike) -> DataProblem | None:
    """Why ``img`` cannot serve as a photo, or None (8-bit colour or greyscale, any alpha)."""
    if img.mode in _NOT_PHOTO_MODES:
        return file_problem(path, f"is a single-channel {img.mode} image, not an 8-bit photo "
                                  "(a label or instance map among the photos?)")
    return None


def id_map_problem(img, path: str | os.PathLike) -> DataProblem | None:
    """Why ``img`` cannot serve as a label/instance id map, or None (one integer channel)."""
    bands = img.getbands()
    if len(bands) != 1:
        return file_problem(path, f"expected a single-channel id map, got a {len(bands)}-channel {img.mode} image "
                                  "(a colour-coded map or a photo?)")
    if img.mode == "F":
        return file_problem(path, "expected integer ids, got a floating-point image")
    return None


def map_in_threads(fn: Callable[[T], list[DataProblem]], items: Sequence[T]) -> list[DataProblem]:
    """``fn`` over ``items`` in a few threads (image decoding releases the GIL), results in order."""
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    if workers == 1:
        return [p for item in items for p in fn(item)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data-check") as pool:
        return [p for found in pool.map(fn, items) for p in found]


# --------------------------------------------------------------------------- the check

def _file_checker(data: Any) -> Callable[[], list[DataProblem]] | None:
    for _ in range(8):
        if data is None:
            return None
        check = getattr(data, "check_files", None)
        if callable(check):
            return check
        data = next((getattr(data, a) for a in _WRAPPED if getattr(data, a, None) is not None), None)
    return None


def check_model_data(model: Any, data_cfg: Any, splits: Sequence[str] = SPLITS) -> list[DataProblem]:
    """What ``GANModel.check_data`` does by default: build each split's data set through
    ``model.dataset`` and check the files of those that read files. Problems in order, each once."""
    problems: list[DataProblem] = []
    for split in splits:
        try:
            data = model.dataset(data_cfg, split)
        except DataError as error:
            problems += error.problems
            data = error.dataset
        except (ValueError, OSError) as error:  # options, kinds: the same for every split, reported once
            problems.append(DataProblem(None, str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - a user's data set may raise anything; report it, no traceback
            problems.append(DataProblem(None, f"building the {split} data set: {type(error).__name__}: {error}"))
            continue
        check = _file_checker(data)
        if check is not None:
            problems += check()
    return list(dict.fromkeys(problems))


def check_study_data(config: Any) -> list[DataProblem]:
    """The problems of a study's data (``config`` an ``orchestrator.config.StudyConfig``), as its
    model sees them (``GANModel.check_data``): the label count and data kinds are the model's."""
    from models.base import load_model

    model = load_model(config.model.name, **config.model.options)
    return list(model.check_data(config.data))


def describe_problems(problems: Sequence[DataProblem], data_cfg: Any, limit: int = 200) -> str:
    """The error message for ``problems``: a header, then one problem per line (the first ``limit``)."""
    where = f" under {Path(data_cfg.root).expanduser()}" if getattr(data_cfg, "root", None) else ""
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    lines = [f"error: the {data_cfg.kind} data{where} is not usable ({count}):"]
    lines += [f"  {problem}" for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
