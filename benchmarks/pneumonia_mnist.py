"""PneumoniaMNIST on CPU: Lepton against the MedMNIST v2 reference training loop, then the preset.

1. Throughput, same model (ResNet-18 at 28 px), same epochs, same run:
   (a) a re-implementation of the MedMNIST v2 reference loop: a per-sample dataset that turns each
       uint8 array into a PIL image, then ToTensor and Normalize(0.5, 0.5); DataLoader(batch 128,
       shuffle); the CIFAR-style ResNet-18 MedMNIST uses at 28 px; Adam 1e-3; MultiStepLR at 50 % and
       75 % of the epochs (gamma 0.1); cross-entropy;
   (b) Lepton's training loop (`lepton.train`) with the same network and epochs.
   Prints training images/s for each and the ratio.
2. The `medmnist` preset, trained through the CLI as a user would, within its 10-minute CPU budget:
   val ACC/AUC with 95 % bootstrap CIs, wall time, peak memory, run directory; test metrics too
   when `--test-file` holds a test split.

The data is read from ../shared/data/pneumoniamnist.npz (or --data); the benchmark skips with a
message when it is absent. `--quick` runs everything on a small slice in under a minute.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_summary
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"


# ---- (a) the reference loop ----------------------------------------------------------------------
class RefBlock(nn.Module):
    """BasicBlock of the CIFAR-style ResNet that MedMNIST v2 trains at 28 px."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class RefResNet18(nn.Module):
    """3×3 stride-1 stem, no max-pool, four stages of two blocks, average pool, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [RefBlock(cin, cout, stride), RefBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class RefDataset(torch.utils.data.Dataset):
    """Per-sample PIL round trip, as the medmnist package's dataset with ToTensor + Normalize."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]  # ToTensor
        return (x - 0.5) / 0.5, self.labels[i]  # Normalize(mean=[.5], std=[.5])


def reference_data_only(images: np.ndarray, labels: np.ndarray) -> float:
    """Images/s of the reference DataLoader alone (no model): the most a faster pipeline can save."""
    loader = torch.utils.data.DataLoader(RefDataset(images, labels.astype(np.int64)), batch_size=128, shuffle=True)
    start, seen = time.perf_counter(), 0
    for _, y in loader:
        seen += len(y)
    return seen / (time.perf_counter() - start)


def reference_loop(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int = 0) -> float:
    """Train the reference loop; return training images per second."""
    torch.manual_seed(seed)
    model = RefResNet18()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.5 * epochs), int(0.75 * epochs)], 0.1)
    loader = torch.utils.data.DataLoader(RefDataset(images, labels.astype(np.int64)), batch_size=128, shuffle=True)
    criterion = nn.CrossEntropyLoss()
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        scheduler.step()
    return seen / (time.perf_counter() - start)


def _val_auc(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    model.eval()
    x = (torch.from_numpy(images.astype(np.float32) / 255.0)[:, None] - 0.5) / 0.5
    with torch.inference_mode():
        probs = torch.cat([torch.softmax(model(x[i:i + 512]), 1)[:, 1] for i in range(0, len(x), 512)])
    return float(roc_auc_score(labels, probs.numpy()))


def reference_to_budget(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                        budget_s: float, test: tuple[np.ndarray, np.ndarray] | None = None,
                        seed: int = 0) -> dict:
    """The reference loop under a wall-clock budget, as its own recipe would be fitted to one: the epochs that fit
    (planned from the first epoch's time), MultiStepLR at 50 % and 75 % of them, val AUC after every epoch (counted
    in the time, as in its own script) and the best-val model kept. Returns the curve and the best figures."""
    import copy

    torch.manual_seed(seed)
    model = RefResNet18()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(RefDataset(train[0], train[1].astype(np.int64)), batch_size=128,
                                         shuffle=True)
    criterion = nn.CrossEntropyLoss()
    start, planned, curve, best = time.perf_counter(), None, [], (-1.0, None)
    epoch = 0
    while True:
        epoch += 1
        if planned:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * 0.1 ** ((epoch > 0.5 * planned) + (epoch > 0.75 * planned))
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        auc = _val_auc(model, *val)
        elapsed = time.perf_counter() - start
        curve.append((elapsed, auc))
        if auc > best[0]:
            best = (auc, copy.deepcopy(model.state_dict()))
        planned = planned or max(1, int(budget_s // elapsed))
        if epoch >= planned or elapsed + elapsed / epoch > budget_s:
            break
    out = {"epochs": epoch, "seconds": curve[-1][0], "val_auc": best[0], "curve": curve}
    if test is not None:
        model.load_state_dict(best[1])
        out["test_auc"] = _val_auc(model, *test)
    return out


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds until the val AUC first reached ``target`` (None: never)."""
    return next((t for t, auc in curve if auc >= target), None)


def training_gflop_per_image(model: nn.Module, batch: int = 32) -> float:
    """Floating-point operations of one forward + backward pass per 28 px image (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 2, (batch,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch / 1e9


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate on all torch threads: a practical ceiling for conv training."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


# ---- helpers -------------------------------------------------------------------------------------
def write_slice(src: Path, out: Path, n_train: int, n_val: int) -> Path:
    """A smaller MedMNIST-format file for --quick (class-balanced slices of train and val)."""
    with np.load(src) as npz:
        arrays = {}
        for split, n in (("train", n_train), ("val", n_val)):
            labels = npz[f"{split}_labels"].ravel()
            idx = np.concatenate([np.flatnonzero(labels == k)[: n // 2] for k in (0, 1)])
            arrays[f"{split}_images"] = npz[f"{split}_images"][idx]
            arrays[f"{split}_labels"] = npz[f"{split}_labels"][idx]
    np.savez(out, **arrays)
    return out


def fmt_metrics(report: dict) -> list[str]:
    lines = []
    for key, m in report["metrics"].items():
        ci = m["ci95"]
        lines.append(f"    threshold {key:>10}: ACC {m['acc']:.4f} [{ci['acc'][0]:.4f}, {ci['acc'][1]:.4f}]  "
                     f"AUC {m['auc']:.4f} [{ci['auc'][0]:.4f}, {ci['auc'][1]:.4f}]")
    return lines


def section_two(args, data: Path, stamp: str, results: dict) -> None:
    """2. The medmnist preset through the CLI, as a user runs it."""
    from lepton.evaluate import evaluate

    print("\n2. The medmnist preset (lepton train DATA --preset medmnist)")
    name = f"pneumoniamnist-preset-{stamp}"
    cmd = [sys.executable, "-m", "lepton.cli", "train", str(data), "--preset", "medmnist", "--name", name,
           "--output-dir", str(args.output), "--quiet"]
    if args.quick:
        cmd += ["--epochs", "2"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr)
        raise SystemExit(1)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    run_dir = args.output / name
    val = evaluate(run_dir, split="val", n_bootstrap=1000, plots=False)
    info = json.loads((run_dir / "run.json").read_text())
    print(f"  training wall time          : {wall:8.1f} s ({info['epochs']} epochs, best epoch {info['best_epoch']})")
    print(f"  peak memory (training)      : {peak_mib:8.0f} MiB")
    print(f"  decision threshold (val)    : {info['threshold']:.4f}")
    print(f"  val ({val['images']} images), 95 % bootstrap CIs:")
    print("\n".join(fmt_metrics(val)))
    results["preset"] = {"run": str(run_dir), "wall_seconds": wall, "peak_memory_mib": peak_mib,
                         "epochs": info["epochs"], "best_epoch": info["best_epoch"],
                         "threshold": info["threshold"], "val": {k: {"acc": m["acc"], "auc": m["auc"],
                                                                     "ci95": m["ci95"]}
                                                                 for k, m in val["metrics"].items()}}
    if args.test_file:
        test = evaluate(run_dir, args.test_file, split="test", n_bootstrap=1000)
        print(f"  test ({test['images']} images):")
        print("\n".join(fmt_metrics(test)))
        results["preset"]["test"] = {k: {"acc": m["acc"], "auc": m["auc"], "ci95": m["ci95"]}
                                     for k, m in test["metrics"].items()}
    print(f"  run directory               : {run_dir}")


def time_to_accuracy(data: Path, args, stamp: str, tmp: Path) -> list[dict]:
    """Section 3: the reference loop and the Lepton preset (per precision) under the same wall-clock budget, one
    after another: best val AUC/ACC, test AUC with --test-file, and the seconds to first reach the target val AUC."""
    import lepton
    from lepton.evaluate import evaluate
    from lepton.models.precision import resolve_precision

    with np.load(data) as npz:
        train = npz["train_images"], npz["train_labels"].ravel()
        val = npz["val_images"], npz["val_labels"].ravel()
    test = None
    if args.test_file:
        with np.load(args.test_file) as npz:
            test = npz["test_images"], npz["test_labels"].ravel()
    print(f"\n3. Time to accuracy: {args.budget:.0f} s each, val AUC {args.target_auc} timed (CPU: {cpu_summary()})")
    rows = []
    ref = reference_to_budget(train, val, args.budget, test)
    rows.append({"row": "reference loop, ResNet-18, fp32", "epochs": ref["epochs"], "seconds": ref["seconds"],
                 "val_auc": ref["val_auc"], "test_auc": ref.get("test_auc"),
                 "reached_s": first_reach(ref["curve"], args.target_auc)})
    precisions = dict.fromkeys(["fp32", resolve_precision("auto", "cpu")])
    for precision in precisions:
        run = lepton.train(data, preset="medmnist", name=f"tta-{precision}-{stamp}", output_dir=str(args.output),
                           time_budget_s=args.budget, precision=precision, quiet=True)
        history = list(csv.DictReader((run.path / "history.csv").open()))
        curve, t = [], 0.0
        for h in history:
            t += float(h["seconds"])
            curve.append((t, float(h["val_auc"])))
        row = {"row": f"Lepton medmnist preset, {run.config.model}, {precision}", "epochs": len(history),
               "seconds": t, "val_auc": run.info["val_auc"], "val_acc": run.info["val_acc"],
               "reached_s": first_reach(curve, args.target_auc)}
        if test is not None:
            report = evaluate(run, args.test_file, split="test", n_bootstrap=0, plots=False)
            row["test_auc"] = report["metrics"][report["primary_threshold"]]["auc"]
        rows.append(row)
    base = rows[0]
    print(f"  {'':<44}{'epochs':>7}{'seconds':>9}{'val AUC':>9}{'test AUC':>10}{'to AUC ' + str(args.target_auc):>14}"
          f"{'sooner':>8}")
    for r in rows:
        reached = f"{r['reached_s']:.0f} s" if r["reached_s"] is not None else "not reached"
        sooner = (f"{base['reached_s'] / r['reached_s']:.1f}x" if r["reached_s"] and base["reached_s"]
                  else ("-" if r is base else "ref never"))
        test_auc = f"{r['test_auc']:.4f}" if r.get("test_auc") is not None else "-"
        print(f"  {r['row']:<44}{r['epochs']:>7}{r['seconds']:>9.0f}{r['val_auc']:>9.4f}{test_auc:>10}"
              f"{reached:>14}{sooner:>8}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--test-file", type=Path, default=None, help="a MedMNIST .npz holding test_* arrays")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the throughput comparison")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--quick", action="store_true", help="a small slice, under a minute")
    parser.add_argument("--skip-compare", action="store_true", help="only train and score the preset")
    parser.add_argument("--skip-preset", action="store_true",
                        help="skip section 2 (section 3 trains the preset too, under --budget)")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds of each time-to-accuracy run (section 3; 0 skips the section)")
    parser.add_argument("--target-auc", type=float, default=0.98, help="the val AUC whose first arrival is timed")
    args = parser.parse_args()

    if not args.data.is_file():
        print(f"SKIP: {args.data} not found; the benchmark needs the shared PneumoniaMNIST file "
              "(pass --data PATH).")
        return 0
    import lepton

    torch.set_num_threads(torch.get_num_threads())
    args.output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    data = write_slice(args.data, tmp / "slice.npz", 384, 128) if args.quick else args.data
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict = {"data": str(args.data), "quick": args.quick, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "cpu": cpu_summary(), "lepton": str(Path(lepton.__file__).parent)}
    print(f"PneumoniaMNIST benchmark ({'quick' if args.quick else 'full'}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"CPU: {cpu_summary()}")

    if not args.skip_compare:
        with np.load(data) as npz:
            images, labels = npz["train_images"], npz["train_labels"].ravel()
        print(f"\n1. Throughput, ResNet-18 @28, {args.epochs} epoch(s) of {len(labels)} training images")
        ref_ips = reference_loop(images, labels, args.epochs)
        print(f"  (a) MedMNIST reference loop : {ref_ips:8.1f} images/s")
        data_ips = reference_data_only(images, labels)
        print(f"      its data pipeline alone : {data_ips:8.1f} images/s "
              f"({100 * ref_ips / data_ips:.1f} % of its training time)")
        run = lepton.train(data, name=f"throughput-{stamp}", output_dir=str(tmp), model="resnet18",
                           epochs=args.epochs, batch_size=128, preset="medmnist", ema_decay=0.0, quiet=True)
        lep_ips = run.info["images_per_s"]
        print(f"  (b) Lepton training loop    : {lep_ips:8.1f} images/s ({run.info['precision']}, "
              f"--precision auto on this CPU)")
        print(f"  ratio (b)/(a)               : {lep_ips / ref_ips:8.2f}x")
        if run.info["precision"] != "fp32":
            run32 = lepton.train(data, name=f"throughput-fp32-{stamp}", output_dir=str(tmp), model="resnet18",
                                 epochs=args.epochs, batch_size=128, preset="medmnist", ema_decay=0.0, quiet=True,
                                 precision="fp32")
            ips32 = run32.info["images_per_s"]
            print(f"  (b32) Lepton loop in fp32   : {ips32:8.1f} images/s, ratio to (a) {ips32 / ref_ips:.2f}x; "
                  f"{run.info['precision']} is {lep_ips / ips32:.2f}x fp32")
        from lepton.models import create_model

        ref_gflop = training_gflop_per_image(RefResNet18())
        lep_gflop = training_gflop_per_image(create_model("resnet18", in_channels=1, num_classes=2, image_size=28))
        peak = matmul_peak_gflops()
        print(f"  training work per image     : reference {ref_gflop:.2f} GFLOP, "
              f"Lepton's resnet18 {lep_gflop:.2f} GFLOP")
        print(f"  arithmetic rate             : (a) {ref_ips * ref_gflop:.0f} GFLOP/s, (b) {lep_ips * lep_gflop:.0f} "
              f"GFLOP/s; fp32 matrix-multiply peak here {peak:.0f} GFLOP/s")
        print(f"  2x the reference would need : {2 * ref_ips * lep_gflop:.0f} GFLOP/s "
              f"= {2 * ref_ips * lep_gflop / peak:.2f}x that peak")
        results["throughput"] = {"reference_images_per_s": ref_ips, "lepton_images_per_s": lep_ips,
                                 "lepton_precision": run.info["precision"],
                                 "ratio": lep_ips / ref_ips, "epochs": args.epochs, "images": len(labels),
                                 "reference_gflop_per_image": ref_gflop, "lepton_gflop_per_image": lep_gflop,
                                 "matmul_peak_gflops": peak}

    if not args.skip_preset:
        section_two(args, data, stamp, results)
    if args.budget and not args.quick:
        results["time_to_accuracy"] = time_to_accuracy(data, args, stamp, tmp)
    (args.output / f"benchmark-{stamp}.json").write_text(json.dumps(results, indent=2))
    print(f"\nfigures written to {args.output / f'benchmark-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
