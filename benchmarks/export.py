"""Export benchmark: a ResNet-18 trained on PneumoniaMNIST, as fp32 PyTorch, ONNX fp32, ONNX int8
(static, calibrated on train images), TorchScript and a 50 %-pruned model.

Prints the comparison table (size, CPU latency at batch 1 and 32, throughput, val ACC/AUC and the delta
against fp32 PyTorch) and checks the target: int8 ONNX at least 2x fp32 PyTorch batch-1 throughput with
val AUC within 0.005. Reads ../shared/data/pneumoniamnist.npz (or --data) and skips when it is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--run", type=Path, default=None, help="export this run instead of training one")
    parser.add_argument("--epochs", type=int, default=3, help="ResNet-18 training epochs")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-export")
    parser.add_argument("--quick", action="store_true", help="lepton_cnn on a slice, under a minute")
    args = parser.parse_args()
    if args.run is None and not args.data.is_file():
        print(f"SKIP: {args.data} not found; pass --data PATH or --run RUN.")
        return 0

    import torch

    import lepton
    from lepton.export import export_run, format_table

    args.output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.run
    if run_dir is None:
        data = args.data
        if args.quick:
            sys.path.insert(0, str(Path(__file__).parent))
            from pneumonia_mnist import write_slice

            data = write_slice(args.data, Path(tempfile.mkdtemp()) / "slice.npz", 384, 128)
        model = "lepton_cnn" if args.quick else "resnet18"
        print(f"training {model} for {1 if args.quick else args.epochs} epoch(s) on {data} ...")
        start = time.perf_counter()
        run = lepton.train(data, name=f"export-{model}-{stamp}", output_dir=str(args.output), model=model,
                           epochs=1 if args.quick else args.epochs, preset="medmnist", tta=False, quiet=True)
        run_dir = run.path
        print(f"trained in {time.perf_counter() - start:.0f} s: val AUC {run.info['val_auc']:.4f}")
    report = export_run(run_dir, formats=("onnx", "torchscript"), quantize="int8", prune=0.5,
                        finetune_epochs=0 if args.quick else 1, output=Path(run_dir) / "export",
                        repeats=10 if args.quick else 50)
    print(f"\nExport comparison on {report['val_images']} val images, {torch.get_num_threads()} threads:")
    print(format_table(report))
    rows = {r["variant"]: r for r in report["variants"]}
    int8, fp32 = rows["onnx-int8"], rows["pytorch-fp32"]
    ratio = int8["throughput_b1"] / fp32["throughput_b1"]
    met = ratio >= 2 and abs(int8["delta_auc"]) <= 0.005
    print(f"\nint8 ONNX vs fp32 PyTorch at batch 1: {ratio:.2f}x throughput, val AUC delta "
          f"{int8['delta_auc']:+.4f} (target >= 2x and |delta| <= 0.005: {'met' if met else 'NOT met'})")
    (args.output / f"export-benchmark-{stamp}.json").write_text(json.dumps(report, indent=2))
    print(f"report: {Path(run_dir) / 'export' / 'export_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
