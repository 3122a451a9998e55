"""Box detection networks: MONAI's RetinaNet (ResNet + FPN backbone, 2-D or 3-D) with anchors fitted to the training
boxes, its loss (ATSS matching, hard-negative sampling) and flip TTA merged by weighted box fusion.

The network answers, in eval mode, a padded array per image (``MAX_DETECTIONS`` rows of ``2·dims`` coordinates as
fractions of each input axis, the score and the class; rows past the detections hold class -1), already through
MONAI's per-class NMS. In train mode it answers its raw head outputs with the anchors, which ``BoxLoss`` scores
against padded targets of the same layout. The fitted anchor shapes are a buffer, so they travel in the state dict.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lepton.models.registry import register_model

#: Detections kept per image (the padded output's rows).
MAX_DETECTIONS = 100
#: Anchor scale of each pyramid level relative to the first (strides 4, 8, 16 of the input).
LEVEL_SCALES = (1, 2, 4)
FIRST_STRIDE = 4
ANCHORS_PER_LOCATION = 3
#: The input's spatial size must be a multiple of this.
DIVISOR = 16
#: Convolution blocks per head (RetinaNet has four; two halve the heads' cost, the bulk of it on a CPU).
HEAD_BLOCKS = 2
#: Boxes of one class from the two flip views with at least this IoU are fused into one.
FUSION_IOU = 0.55


def _default_shapes(spatial_dims: int) -> torch.Tensor:
    return torch.tensor([[s] * spatial_dims for s in (6.0, 10.0, 16.0)])


def fit_anchor_shapes(sizes: np.ndarray, k: int = ANCHORS_PER_LOCATION, scales=LEVEL_SCALES) -> np.ndarray:
    """Base anchor shapes (k, dims) in pixels fitted to training box sizes (n, dims): each box is assigned the pyramid
    level whose scale brings it nearest the smallest boxes, divided by that scale, and the results are clustered by
    k-means on log sizes (so the anchors of all levels together span the boxes' sizes and aspect ratios)."""
    sizes = np.asarray(sizes, np.float64)
    dims = sizes.shape[1] if sizes.ndim == 2 else 2
    if len(sizes) == 0:
        return _default_shapes(dims).numpy()
    g = np.exp(np.log(np.maximum(sizes, 1.0)).mean(1))
    g0 = max(float(np.quantile(g, 0.1)), 2.0)
    level = np.clip(np.round(np.log2(g / g0)), 0, len(scales) - 1).astype(int)
    logs = np.log(np.maximum(sizes / np.asarray(scales, np.float64)[level][:, None], 1.0))
    order = np.argsort(logs.mean(1))
    centres = logs[order[np.linspace(0, len(order) - 1, k).round().astype(int)]].copy()
    for _ in range(20):
        assign = np.argmin(((logs[:, None, :] - centres[None]) ** 2).sum(-1), 1)
        for j in range(k):
            if np.any(assign == j):
                centres[j] = logs[assign == j].mean(0)
    shapes = np.exp(centres)
    return np.maximum(shapes[np.argsort(shapes.prod(1))], 2.0).astype(np.float32)


@functools.cache
def _exact_anchors() -> type:
    """MONAI's ``AnchorGeneratorWithAnchorShape`` without its rounding of the base anchors' corners to whole pixels
    (a class built on first use: monai is imported lazily)."""
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

    class ExactAnchors(AnchorGeneratorWithAnchorShape):
        @staticmethod
        def generate_anchors_using_shape(anchor_shapes: torch.Tensor, dtype: torch.dtype = torch.float32,
                                         device: torch.device | None = None) -> torch.Tensor:
            half = anchor_shapes / 2.0
            return torch.cat([-half, half], dim=1).to(dtype=dtype, device=device)

    return ExactAnchors


class _ResNetFPN(nn.Module):
    """The stem and first two stages of a MONAI ResNet under MONAI's feature pyramid (strides 4, 8 and a max-pooled
    16): RetinaNet's feature extractor, without torchvision's layer getter."""

    def __init__(self, backbone: nn.Module, in_channels_list: list[int], out_channels: int, spatial_dims: int):
        super().__init__()
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act, backbone.maxpool)
        self.layer1, self.layer2 = backbone.layer1, backbone.layer2
        self.fpn = FeaturePyramidNetwork(spatial_dims, in_channels_list, out_channels,
                                         extra_blocks=LastLevelMaxPool(spatial_dims))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor):
        from collections import OrderedDict

        f1 = self.layer1(self.stem(x))
        return self.fpn(OrderedDict([("0", f1), ("1", self.layer2(f1))]))


class _HeadMaps(nn.Module):
    """The RetinaNet's head maps as one flat tuple, class logits per pyramid level then box regressions per level:
    the graph ONNX export writes for a ``BoxDetector`` (``BoxDetector.onnx_graph``)."""

    def __init__(self, network: nn.Module, keys: tuple[str, str]):
        super().__init__()
        self.network, self.keys = network, keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        head = self.network(x)
        return tuple(m for key in self.keys for m in head[key])


class _GraphHeads(nn.Module):
    """Head maps computed outside PyTorch (``run``: float32 array (N, C, …) to ``_HeadMaps``'s outputs as arrays, e.g.
    an ONNX Runtime session on its graph), answered as the RetinaNet answers them, a dict of per-level lists."""

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]], keys: tuple[str, str], levels: int):
        super().__init__()
        self.run, self.keys, self.levels = run, keys, levels

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        maps = [torch.from_numpy(np.asarray(m)).to(x.device) for m in self.run(x.detach().float().cpu().numpy())]
        if len(maps) != len(self.keys) * self.levels:
            raise RuntimeError(f"the exported graph answered {len(maps)} head maps; the detector reads "
                               f"{len(self.keys) * self.levels} ({self.levels} levels of class logits and boxes)")
        return {key: maps[i * self.levels:(i + 1) * self.levels] for i, key in enumerate(self.keys)}


class BoxDetector(nn.Module):
    """RetinaNet over a small ResNet + FPN (64 channels), with MONAI's anchors, box coder and box selector."""

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 2, width: int = 32,
                 fpn_channels: int = 64):
        super().__init__()
        from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
        from monai.apps.detection.networks.retinanet_network import RetinaNet
        from monai.networks.nets import resnet

        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        backbone = resnet.ResNet(block="basic", layers=(1, 1, 1, 1), block_inplanes=[width, 2 * width, 4 * width,
                                 8 * width], spatial_dims=spatial_dims, n_input_channels=in_channels,
                                 conv1_t_size=7, conv1_t_stride=2, num_classes=1)
        fpn = _ResNetFPN(backbone, [width, 2 * width], fpn_channels, spatial_dims)
        network = RetinaNet(spatial_dims=spatial_dims, num_classes=num_classes, num_anchors=ANCHORS_PER_LOCATION,
                            feature_extractor=fpn, size_divisible=DIVISOR)
        for head in (network.classification_head, network.regression_head):  # two of the four conv blocks: CPU cost
            head.conv = nn.Sequential(*list(head.conv.children())[:3 * HEAD_BLOCKS])
        self.register_buffer("anchor_shapes", _default_shapes(spatial_dims))
        # 1: anchors of exactly the fitted shapes; 0 (runs saved before it existed): MONAI's rounded corners
        self.register_buffer("exact_anchors", torch.ones(()))
        # the median training image shape (zeros: unknown); with the input size it gives the scale training saw
        self.register_buffer("source_shape", torch.zeros(spatial_dims))
        self.detector = RetinaNetDetector(network, self._generator(self.anchor_shapes, exact=True))
        self.detector.set_box_selector_parameters(score_thresh=0.02, topk_candidates_per_level=100, nms_thresh=0.3,
                                                  detections_per_img=MAX_DETECTIONS)
        self._built = self._key()

    @staticmethod
    def _generator(shapes: torch.Tensor, *, exact: bool):
        """MONAI's anchor generator for base shapes (k, dims) at ``LEVEL_SCALES``; ``exact``: the anchors have the
        shapes given, where MONAI rounds each anchor's corners to whole pixels — which turns a 5-voxel anchor into a
        4-voxel one and a 3.3-voxel one into 4 (half-to-even on ±2.5, ±1.65), undoing the fit for lesions a few
        voxels across."""
        from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

        base = [tuple(float(v) for v in s) for s in shapes.tolist()]
        if not exact:
            return AnchorGeneratorWithAnchorShape(feature_map_scales=LEVEL_SCALES, base_anchor_shapes=base)
        return _exact_anchors()(feature_map_scales=LEVEL_SCALES, base_anchor_shapes=base)

    def _key(self) -> tuple:
        return (*(round(float(v), 4) for v in self.anchor_shapes.flatten().tolist()), bool(self.exact_anchors))

    def set_anchor_shapes(self, shapes: np.ndarray) -> None:
        """Use base anchor shapes (k, dims) in pixels (``fit_anchor_shapes``)."""
        self.anchor_shapes.copy_(torch.as_tensor(np.asarray(shapes), dtype=torch.float32))
        self._sync()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "source_shape", self.source_shape.clone())  # runs saved before it existed
        state_dict.setdefault(prefix + "exact_anchors", torch.zeros(()))  # trained on MONAI's rounded anchors
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _sync(self) -> None:
        if self._key() != self._built:  # new shapes fitted or loaded with the state dict
            self.detector.anchor_generator = self._generator(self.anchor_shapes.cpu(), exact=bool(self.exact_anchors))
            self.detector.anchors = None
            self._built = self._key()

    def forward(self, x: torch.Tensor):
        self._sync()
        det = self.detector
        head = det.network(x)
        maps = {key: list(head[key]) for key in (det.cls_key, det.box_reg_key)}
        anchors = det.anchor_generator(x, maps[det.cls_key])
        locs = [m.shape[2:].numel() for m in maps[det.cls_key]]
        flat = {key: det._reshape_maps(maps[key]) for key in maps}
        size = torch.tensor(x.shape[2:], dtype=torch.float32)
        if self.training:
            return {"cls": flat[det.cls_key], "box": flat[det.box_reg_key], "anchors": anchors[0],
                    "locs": torch.tensor(locs), "size": size}
        with torch.no_grad():  # boxes are answers, never differentiated (MONAI's NMS deep-copies its input)
            found = det.postprocess_detections({k: v.detach() for k, v in flat.items()}, anchors,
                                               [list(x.shape[2:])] * len(x), locs)
        return pack_detections(found, size.to(x.device), self.spatial_dims)

    def detect_windows(self, x: torch.Tensor, roi: tuple[int, ...], *, overlap: float = 0.25,
                       cval: float = 0.0) -> torch.Tensor:
        """Detections on inputs larger than the network's input (eval mode), padded as ``forward`` answers them
        (coordinates as fractions of ``x``'s axes): MONAI's sliding-window inferer runs the network over windows of
        ``roi`` (``overlap``; ``cval`` pads the input to a multiple of the network's divisor) and stitches its head
        maps, anchors cover the whole input, and one per-class NMS over the whole input merges boxes that windows
        share."""
        import torch.nn.functional as F
        from monai.apps.detection.utils.predict_utils import predict_with_inferer

        self._sync()
        det = self.detector
        size = torch.tensor(x.shape[2:], dtype=torch.float32, device=x.device)
        pad = [(-int(n)) % DIVISOR for n in x.shape[2:]]
        if any(pad):
            x = F.pad(x, [v for p in reversed(pad) for v in (0, p)], value=cval)
        det.set_sliding_window_inferer(roi_size=list(roi), sw_batch_size=1, overlap=overlap, mode="constant",
                                       padding_mode="constant", cval=cval)
        with torch.no_grad():
            maps = predict_with_inferer(x, det.network, keys=[det.cls_key, det.box_reg_key], inferer=det.inferer)
            anchors = det.anchor_generator(x, maps[det.cls_key])
            locs = [m.shape[2:].numel() for m in maps[det.cls_key]]
            flat = {key: det._reshape_maps(maps[key]) for key in maps}
            found = det.postprocess_detections(flat, anchors, [[int(n) for n in size.tolist()]] * len(x), locs)
        return pack_detections(found, size, self.spatial_dims)

    def box_saliency(self, x: torch.Tensor, rows: torch.Tensor, *, iou: float = 0.5) -> torch.Tensor:
        """A Grad-CAM-style map per detection (HiResCAM: gradient times activation summed over channels, so each
        map stays within the receptive field of its box's anchors) on the first backbone stage (stride 4), for one
        input ``x`` (1, C, …) and its detections ``rows`` (n, 2·dims + 2; fractions, score, class): the gradient
        is of the box's class logit summed over the anchors whose decoded boxes overlap the box with IoU ≥ ``iou``
        (else the best-overlapping one). Returns (n, *x's spatial shape), each map scaled to [0, 1]."""
        import torch.nn.functional as F
        from monai.data.box_utils import box_iou

        self._sync()
        det, dims = self.detector, self.spatial_dims
        stage = det.network.feature_extractor.layer1
        size = torch.tensor(x.shape[2:], dtype=torch.float32, device=x.device)
        kept: dict[str, torch.Tensor] = {}
        hook = stage.register_forward_hook(lambda _m, _i, out: kept.__setitem__("act", out))
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                head = det.network(x)
                maps = {key: list(head[key]) for key in (det.cls_key, det.box_reg_key)}
                anchors = det.anchor_generator(x, maps[det.cls_key])[0]
                cls = det._reshape_maps(maps[det.cls_key])[0]
                found = det.box_coder.decode_single(det._reshape_maps(maps[det.box_reg_key])[0].detach().float(),
                                                    anchors)
                act = kept["act"]
                out = []
                for row in rows:
                    target = (row[:2 * dims] * torch.cat([size, size]))[None]
                    overlap = box_iou(found, target)[:, 0]
                    chosen = overlap >= iou if bool((overlap >= iou).any()) else overlap == overlap.max()
                    (grad,) = torch.autograd.grad(cls[chosen, int(row[-1])].sum(), act, retain_graph=True)
                    cam = F.relu((grad * act).sum(1, keepdim=True))
                    mode = "bilinear" if dims == 2 else "trilinear"
                    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, align_corners=False)[0, 0]
                    out.append((cam / cam.max().clamp_min(1e-12)).detach())
        finally:
            hook.remove()
            self.train(was_training)
        return torch.stack(out) if out else torch.zeros(0, *x.shape[2:])

    def onnx_graph(self) -> tuple[nn.Module, list[str]]:
        """What ONNX export writes for this network (``lepton.export.export_onnx``): the module giving its head maps,
        class logits then box regressions per pyramid level, for a batch of inputs (or windows) of the network's
        size, and their output names. Anchors, box decoding and NMS stay outside the graph — a volume's windows are
        stitched into head maps over the whole volume before its anchors and one NMS (``detect_windows``) — and run
        here around it (``use_graph``)."""
        keys = (self.detector.cls_key, self.detector.box_reg_key)
        return _HeadMaps(self.detector.network, keys), [f"{k}_{i}" for k in ("class_logits", "box_regression")
                                                        for i in range(len(LEVEL_SCALES))]

    def use_graph(self, run: Callable[[np.ndarray], list[np.ndarray]]) -> None:
        """Compute the head maps with ``run`` (a float32 input (N, C, …) to ``onnx_graph``'s outputs as arrays: an
        ONNX Runtime session on its graph) in place of the network's layers, which are dropped: ``forward``,
        ``detect_windows`` and flip TTA then answer through the same anchors, decoding, window merging and NMS as in
        PyTorch. ``box_saliency`` needs the layers."""
        keys = (self.detector.cls_key, self.detector.box_reg_key)
        self.detector.network = _GraphHeads(run, keys, len(LEVEL_SCALES))

    def merge_flipped(self, outputs: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """Flip TTA: the detections on the input flipped along its last axis, mapped back and fused with those on the
        input (weighted box fusion per class; a box seen in one view only keeps half its score)."""
        back = unflip(flipped, self.spatial_dims)
        return torch.stack([fuse(torch.cat([a, b]), self.spatial_dims, views=2) for a, b in zip(outputs, back,
                                                                                               strict=True)])


def pack_detections(found: list[dict], size: torch.Tensor, dims: int) -> torch.Tensor:
    """MONAI's per-image detections as one padded tensor (N, MAX_DETECTIONS, 2·dims + 2), coordinates normalised."""
    out = torch.zeros(len(found), MAX_DETECTIONS, 2 * dims + 2, device=size.device)
    out[..., -1] = -1
    scale = torch.cat([size, size])
    for i, d in enumerate(found):
        n = min(len(d["boxes"]), MAX_DETECTIONS)
        if n:
            order = torch.argsort(d["labels_scores"], descending=True)[:n]
            out[i, :n, :2 * dims] = d["boxes"][order].float() / scale
            out[i, :n, -2] = d["labels_scores"][order].float()
            out[i, :n, -1] = d["labels"][order].float()
    return out


def unflip(rows: torch.Tensor, dims: int) -> torch.Tensor:
    """Detections made on inputs flipped along the last axis, in the unflipped input's normalised coordinates."""
    out = rows.clone()
    lo, hi = dims - 1, 2 * dims - 1
    valid = rows[..., -1] >= 0
    out[..., lo] = torch.where(valid, 1 - rows[..., hi], rows[..., lo])
    out[..., hi] = torch.where(valid, 1 - rows[..., lo], rows[..., hi])
    return out


def fuse(rows: torch.Tensor, dims: int, views: int) -> torch.Tensor:
    """Weighted box fusion of one image's detections from ``views`` views: boxes of a class, highest score first,
    join the first cluster whose leading box they overlap with IoU ≥ ``FUSION_IOU``; a cluster's box is the
    score-weighted mean, its score the sum over views divided by ``views``. Returns the padded (MAX_DETECTIONS,
    2·dims + 2) rows."""
    from monai.data.box_utils import box_iou

    rows = rows[rows[:, -1] >= 0]
    rows = rows[torch.argsort(rows[:, -2], descending=True)]
    fused = []
    for label in rows[:, -1].unique():
        same = rows[rows[:, -1] == label]
        overlap = box_iou(same[:, :2 * dims], same[:, :2 * dims])  # one matrix, MONAI's box ops
        owner = torch.full((len(same),), -1, dtype=torch.long)
        for j in range(len(same)):  # the highest-scoring unclaimed box leads a cluster
            if owner[j] < 0:
                owner[(owner < 0) & (overlap[j] >= FUSION_IOU)] = j
                owner[j] = j
        for lead in owner.unique():
            group = same[owner == lead]
            w = group[:, -2:-1]
            box = (group[:, :2 * dims] * w).sum(0) / w.sum().clamp_min(1e-8)
            score = group[:, -2].sum() / views
            fused.append(torch.cat([box, score.clamp(max=1.0)[None], label[None]]))
    out = torch.zeros(MAX_DETECTIONS, 2 * dims + 2, device=rows.device)
    out[:, -1] = -1
    if fused:
        table = torch.stack(fused)
        table = table[torch.argsort(table[:, -2], descending=True)][:MAX_DETECTIONS]
        out[:len(table)] = table
    return out


class BoxLoss:
    """RetinaNet's loss (MONAI: ATSS anchor matching, hard-negative sampling, BCE on the sampled anchors and smooth
    L1 on the matched boxes) of train-mode outputs against padded normalised targets (N, M, 2·dims + 1)."""

    def __init__(self, spatial_dims: int, num_classes: int):
        from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

        class _Shape(nn.Module):  # the detector reads the network's geometry from these attributes only
            def __init__(self):
                super().__init__()
                self.spatial_dims, self.num_classes, self.size_divisible = spatial_dims, num_classes, DIVISOR
                self.cls_key, self.box_reg_key, self.num_anchors = "classification", "box_regression", \
                    ANCHORS_PER_LOCATION

        class _AtssDetector(RetinaNetDetector):
            def compute_anchor_matched_idxs(self, anchors, targets, num_anchor_locs_per_level):
                # MONAI's own method first asks isinstance(matcher, torchvision's Matcher), which fails without
                # torchvision (never a dependency here); this is its ATSS branch alone.
                out = []
                for anchors_per_image, target in zip(anchors, targets, strict=True):
                    if target["boxes"].numel() == 0:
                        out.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                              device=anchors_per_image.device))
                        continue
                    _, matched = self.proposal_matcher(target["boxes"].to(anchors_per_image.device), anchors_per_image,
                                                       num_anchor_locs_per_level, self.num_anchors_per_loc)
                    out.append(matched)
                return out

        # the anchors come with the outputs (``BoxDetector.forward``); this generator is never asked
        self.det = _AtssDetector(_Shape(), BoxDetector._generator(_default_shapes(spatial_dims), exact=True))
        self.det.set_atss_matcher(num_candidates=4, center_in_gt=False)
        self.det.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
        self.dims = spatial_dims

    def __call__(self, out: dict, y: torch.Tensor) -> torch.Tensor:
        det, dims = self.det, self.dims
        size = out["size"].to(y.device)
        scale = torch.cat([size, size])
        targets = []
        for rows in y:
            rows = rows[rows[:, -1] >= 0]
            targets.append({"boxes": rows[:, :2 * dims].float() * scale, "labels": rows[:, -1].long()})
        anchors = [out["anchors"]] * len(y)
        locs = [int(v) for v in out["locs"]]
        losses = det.compute_loss({det.cls_key: out["cls"].float(), det.box_reg_key: out["box"].float()}, targets,
                                  anchors, locs)
        return losses[det.cls_key] + losses[det.box_reg_key]


@register_model("retinanet", "RetinaNet (MONAI; 2-D or 3-D box detection, ResNet + FPN, fitted anchors)",
                head="detector.network.classification_head", spatial_dims=(2, 3), output="boxes", divisor=DIVISOR)
def retinanet(in_channels: int, num_classes: int, image_size: int, spatial_dims: int = 2) -> nn.Module:
    return BoxDetector(in_channels, num_classes, spatial_dims)
