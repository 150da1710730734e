"""Small matplotlib helpers: heatmaps, boxes and curves for the lessons, detections for the CLI.

The plotting functions draw on a given ``Axes`` and return what they drew, so a notebook keeps
control of the figure layout; :func:`render_detections` and :func:`render_targets` draw off-screen
into an array.
Coordinates follow the library (``ARCHITECTURE.md``): points ``(x, y)``, boxes ``xyxy``, maps
``(H, W)``; pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``, as in COCO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

__all__ = [
    "class_colour", "show_heatmap", "draw_boxes", "plot_curves", "render_detections", "render_targets",
    "save_training_curves",
]


def class_colour(label: int) -> tuple[float, float, float, float]:
    """The RGBA colour of class ``label`` (matplotlib's ``tab10`` cycle)."""
    return colormaps["tab10"](int(label) % 10)


def show_heatmap(
    ax: Axes,
    heatmap: np.ndarray,
    image: np.ndarray | None = None,
    alpha: float = 0.6,
    cmap: str = "magma",
    vmax: float = 1.0,
) -> AxesImage:
    """Show a heatmap, alone or stretched over an image.

    Args:
        ax: where to draw.
        heatmap: ``(H, W)``, or ``(C, H, W)`` reduced with a max over the classes; a torch tensor
            is accepted too (it is detached and moved to the CPU).
        image: optional ``(H_img, W_img, 3)`` uint8 RGB image. The heatmap is then stretched over
            it with transparency ``alpha``, so axes are in image pixels (boxes in image pixels line
            up); without an image the axes are in heatmap pixels.
        alpha: opacity of the heatmap over the image (ignored without an image).
        cmap: matplotlib colour map.
        vmax: value shown with the brightest colour (the colour scale runs from 0).

    Returns:
        The heatmap's ``AxesImage`` (pass it to ``plt.colorbar`` for a scale).
    """
    if hasattr(heatmap, "detach"):
        heatmap = heatmap.detach().cpu().numpy()
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim == 3:
        heatmap = heatmap.max(axis=0)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (H, W) or (C, H, W), got shape {heatmap.shape}")
    height, width = heatmap.shape
    if image is not None:
        height, width = image.shape[:2]
        ax.imshow(image, extent=(0, width, height, 0))
    shown = ax.imshow(
        heatmap,
        cmap=cmap,
        vmin=0.0,
        vmax=vmax,
        alpha=alpha if image is not None else None,
        extent=(0, width, height, 0),
        interpolation="nearest",
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return shown


def draw_boxes(
    ax: Axes,
    boxes: np.ndarray,
    labels: Sequence[int] | np.ndarray | None = None,
    scores: Sequence[float] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    color: str | tuple | None = None,
    linewidth: float = 1.5,
    linestyle: str = "-",
) -> list[Rectangle]:
    """Draw ``xyxy`` boxes, with an optional ``"name score"`` caption at each top-left corner.

    Args:
        ax: where to draw.
        boxes: ``(N, 4)`` ``xyxy`` in the axes' coordinates (image pixels over an image).
        labels: ``(N,)`` class indices; they pick the colour (:func:`class_colour`) and the caption.
        scores: ``(N,)`` confidences added to the caption.
        class_names: names indexed by label (default: the label number).
        color: one colour for every box; default: by label, or white without labels.
        linewidth: edge width in points.
        linestyle: matplotlib line style, e.g. ``"--"`` for ground truth under predictions.

    Returns:
        The ``Rectangle`` patches, one per box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    patches = []
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        label = None if labels is None else int(labels[k])
        edge = color if color is not None else ("white" if label is None else class_colour(label))
        rect = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=edge, lw=linewidth, ls=linestyle)
        ax.add_patch(rect)
        patches.append(rect)
        caption = [] if label is None else [class_names[label] if class_names is not None else str(label)]
        if scores is not None:
            caption.append(f"{float(scores[k]):.2f}")
        if caption:
            ax.text(
                x1, y1, " ".join(caption), color="white", fontsize=7, va="bottom",
                bbox={"facecolor": edge, "edgecolor": "none", "pad": 1, "alpha": 0.8},
            )
    return patches


def plot_curves(
    ax: Axes,
    curves: Mapping[str, Sequence[float] | np.ndarray],
    x: Sequence[float] | np.ndarray | None = None,
    xlabel: str = "",
    ylabel: str = "",
    logy: bool = False,
    **line_kwargs,
) -> list[Line2D]:
    """Plot named curves that share one x axis (loss curves, or a quantity against a parameter).

    Args:
        ax: where to draw.
        curves: ``{name: (T,) values}``; the name goes into the legend.
        x: ``(T,)`` abscissae shared by every curve (default ``0 .. T-1``, e.g. steps or epochs).
        xlabel, ylabel: axis labels.
        logy: logarithmic y axis.
        **line_kwargs: passed to every ``ax.plot`` call (``linestyle``, ``linewidth``, ...).

    Returns:
        The plotted lines, in the order of ``curves``.
    """
    lines = []
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        xs = np.arange(len(values)) if x is None else np.asarray(x)
        lines.extend(ax.plot(xs, values, label=name, **line_kwargs))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return lines


def render_detections(
    image: np.ndarray,
    prediction: Mapping[str, np.ndarray],
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Draw one image's detections with :func:`draw_boxes` and return the picture as an array.

    Renders off-screen (matplotlib's Agg canvas, no window, no global state).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        prediction: ``{"boxes": (N, 4) xyxy image pixels, "scores": (N,), "labels": (N,)}``, numpy
            arrays or CPU tensors (a detector's output for this image).
        class_names: names indexed by label (default: the label number).

    Returns:
        ``(H, W, 3)`` uint8 RGB, the image with a box and a ``"name score"`` caption per detection.
    """
    height, width = image.shape[:2]
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_axis_off()
    labels = np.asarray(prediction["labels"]).astype(np.int64)
    draw_boxes(ax, np.asarray(prediction["boxes"]), labels=labels, scores=np.asarray(prediction["scores"]),
               class_names=class_names, linewidth=1.0)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _numpy(array) -> np.ndarray:
    """A numpy array from an array or a tensor on any device."""
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


_HEATMAP_KEYS = {"centernet": ("hm",), "cornernet": ("tl_hm", "br_hm")}  # the targets' heatmaps, by task


def _target_boxes(targets: Mapping[str, np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(N, 4)`` ``xyxy`` in output-map pixels and labels ``(N,)`` of the objects a sample's
    targets encode (the inverse of :func:`minicenternet.targets.encode_centernet` or
    ``encode_cornernet``): a point is its map index ``y W + x`` plus its offset; a CenterNet box
    spans the point +- half its size. The label is the class whose heatmap peaks (value 1) at the
    centre (CenterNet) or top-left corner (CornerNet)."""
    keep = _numpy(targets["mask"]) > 0
    heatmap = _numpy(targets[_HEATMAP_KEYS[task][0]])  # (C, H, W)

    def points(index_key: str, offset_key: str) -> np.ndarray:  # (N, 2) (x, y)
        ys, xs = np.divmod(_numpy(targets[index_key])[keep], heatmap.shape[-1])
        return np.stack([xs, ys], axis=1) + _numpy(targets[offset_key])[keep]

    if task == "centernet":
        first, half = points("ind", "reg"), _numpy(targets["wh"])[keep] / 2
        boxes = np.concatenate([first - half, first + half], axis=1)
    else:
        first = points("tl_ind", "tl_off")
        boxes = np.concatenate([first, points("br_ind", "br_off")], axis=1)
    xs, ys = first.astype(np.int64).T  # the peak pixel (offsets are in [0, 1))
    return boxes.astype(np.float64), heatmap[:, ys, xs].argmax(axis=0)


def render_targets(
    image: np.ndarray,
    targets: Mapping[str, np.ndarray],
    class_names: Sequence[str] | None = None,
    task: str = "centernet",
) -> np.ndarray:
    """Draw one training sample as the network is asked to see it: the image with the boxes decoded
    back from its targets, then each ground-truth heatmap (max over classes) over the image.

    For the ``show-targets`` command: a box or a peak out of place shows an encoding or augmentation
    error. Renders off-screen (the Agg canvas, as :func:`render_detections`).

    Args:
        image: the sample's image, ``(H, W, 3)`` or ``(3, H, W)`` uint8 RGB (a ``(3, H, W)`` array
            is recognised by its first axis being 3 and its last not); a tensor is accepted.
        targets: the sample's targets (numpy arrays or tensors) at the output stride, as made by
            ``encode_centernet`` (``hm``, ``wh``, ``reg``, ``ind``, ``mask``) or ``encode_cornernet``.
        class_names: names indexed by label for the box captions (default: the label number).
        task: ``"centernet"`` (one heatmap panel, ``hm``) or ``"cornernet"`` (``tl_hm``, ``br_hm``).

    Returns:
        ``(H, P W, 3)`` uint8 RGB with ``P = 2`` panels for CenterNet and 3 for CornerNet, side by
        side: the boxes, then the heatmaps stretched over the image (the stride is ``W / W_map``).
    """
    if task not in _HEATMAP_KEYS:
        raise ValueError(f"unknown task {task!r}; choose from {tuple(_HEATMAP_KEYS)}")
    image = _numpy(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    height, width = image.shape[:2]
    boxes, labels = _target_boxes(targets, task)
    map_h, map_w = _numpy(targets[_HEATMAP_KEYS[task][0]]).shape[-2:]
    boxes *= np.array([width / map_w, height / map_h] * 2)
    panels, dpi = 1 + len(_HEATMAP_KEYS[task]), 100
    fig = Figure(figsize=(panels * width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1 / panels, 1))
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    draw_boxes(ax, boxes, labels=labels, class_names=class_names, linewidth=1.0)
    ax.set(xlim=(0, width), ylim=(height, 0))
    ax.set_axis_off()
    for panel, key in enumerate(_HEATMAP_KEYS[task], start=1):
        ax = fig.add_axes((panel / panels, 0, 1 / panels, 1))
        show_heatmap(ax, _numpy(targets[key]), image=image)
        ax.text(1, 1, key, color="white", fontsize=7, va="top")
        ax.set_axis_off()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_training_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Write a PNG with the loss terms (left) and the validation AP (right) of a run, per epoch.

    Args:
        history: one record per epoch, as in ``metrics.jsonl`` (keys ``epoch``, ``loss``,
            ``hm_loss``, ``wh_loss``, ``off_loss`` and, on validated epochs, ``AP``, ``AP50``).
        path: the PNG to write.
    """
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, ap_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    terms = {k: [r.get(k, np.nan) for r in history] for k in ("loss", "hm_loss", "wh_loss", "off_loss")}
    plot_curves(loss_ax, terms, epochs, "epoch", "training loss", logy=True)
    validated = [r for r in history if "AP" in r]
    if validated:
        plot_curves(ap_ax, {k: [r[k] for r in validated] for k in ("AP", "AP50")},
                    [r["epoch"] for r in validated], "epoch", "val COCO AP", marker="o")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
