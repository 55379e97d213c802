#!/usr/bin/env python3
"""Benchmark inputs and the PyTorch reference for vlembed's benchmark (scripts/bench.sh).

Two commands:

    bench_reference.py inputs --out DIR [--n 32]
        writes DIR/images/img_NN.jpg (640x480 JPEGs, quality 90, 4:2:0) and
        DIR/texts.txt (one short caption per line). The images are crops of the
        real photographs in ../shared/testdata/bge-vl-demo when that folder
        exists, else synthetic scenes; either way deterministic.

    bench_reference.py run --model DIR --inputs DIR [--batch-sizes 1,8,32]
                           [--reps 5] [--warmup 1] [--text-latency-reps 50]
                           [--threads N] [--precisions f32,bf16] [--json OUT]
        measures transformers' CLIPModel + CLIPProcessor (the models' own
        Python code path) on those inputs: images/s with preprocessing
        (PIL decode of the in-memory JPEG bytes + CLIPProcessor + forward) and
        the forward alone, texts/s (tokenizer + forward), and the latency of one
        short text, in f32 and with bf16 autocast. Every figure is the median
        over --reps timed repetitions after --warmup untimed ones.

    bench_reference.py threads --pid PID --json OUT
        snapshots the threads of a process (name, CPU time, context switches).

    bench_reference.py report --run DIR [--out FILE] [--update BENCHMARKS.md]
        renders the results of one scripts/bench.sh run as Markdown tables and
        replaces that model's section of BENCHMARKS.md.

Same environment as scripts/make_fixtures.py (torch 2.5.1, transformers 4.45.2);
`threads` and `report` need only the standard library.
"""

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(os.path.dirname(REPO), "shared", "testdata", "bge-vl-demo")

W, H = 640, 480

CAPTIONS = [
    "a photo of a cat",
    "a dog running on the beach",
    "two people riding bicycles",
    "a red car parked on the street",
    "a bowl of fresh fruit",
    "a city skyline at night",
    "a child flying a kite",
    "a plate of pasta with tomato sauce",
    "a snowy mountain under a blue sky",
    "an old wooden boat on a lake",
    "a man reading a newspaper",
    "a bird sitting on a branch",
    "a living room with a green sofa",
    "a train crossing a bridge",
    "a woman holding an umbrella",
    "a field of yellow flowers",
    "a laptop on a wooden desk",
    "a herd of cows in a meadow",
    "a lighthouse near the sea",
    "a cup of coffee and a croissant",
    "a skateboarder doing a trick",
    "a black and white photo of a street",
    "a tennis player hitting the ball",
    "a kitchen with white cabinets",
    "a horse standing in a field",
    "a group of friends at dinner",
    "a bus stopped at a traffic light",
    "a close-up of a sunflower",
    "a pizza with mushrooms and olives",
    "an airplane taking off",
    "a bridge over a river at sunset",
    "a teddy bear on a bed",
]


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------

def photo_crops(n):
    """n 640x480 RGB images cut from the demo photographs (None if absent)."""
    from PIL import Image

    if not os.path.isdir(DEMO):
        return None
    names = ["cir_candi_2.png", "000000050549.jpg", "000000530944.jpg", "cir_candi_1.png",
             "cir_query.png", "000000032077.jpg"]
    sources = []
    for name in names:
        p = os.path.join(DEMO, name)
        if os.path.exists(p):
            with Image.open(p) as im:
                sources.append(im.convert("RGB"))
    if not sources:
        return None
    out = []
    big = sources[0]
    i = 0
    while len(out) < n:
        src = sources[i % len(sources)] if i % 2 else big
        # a window of the source at some scale, resized to 640x480
        scale = [1.0, 0.8, 0.6, 0.45][(i // 2) % 4]
        sw = max(1, int(min(src.width, src.height * 4 / 3) * scale))
        sh = max(1, int(sw * 3 / 4))
        steps = 5
        x = ((i * 7) % steps) * max(0, src.width - sw) // (steps - 1)
        y = ((i * 3) % steps) * max(0, src.height - sh) // (steps - 1)
        crop = src.crop((x, y, x + sw, y + sh)).resize((W, H), Image.Resampling.LANCZOS)
        if i % 3 == 1:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop)
        i += 1
    return out


def synthetic(n):
    """n 640x480 synthetic scenes (gradients, shapes, mild noise)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(20261129)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        base = np.stack([
            128 + 100 * np.sin(xx / rng.uniform(40, 200) + rng.uniform(0, 6)),
            128 + 100 * np.cos(yy / rng.uniform(40, 200) + rng.uniform(0, 6)),
            128 + 80 * np.sin((xx + yy) / rng.uniform(60, 300)),
        ], axis=-1)
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = rng.integers(0, W), rng.integers(0, H)
            x1, y1 = x0 + rng.integers(20, 250), y0 + rng.integers(20, 250)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=color)
        im = im.filter(ImageFilter.GaussianBlur(1.2))
        arr = np.asarray(im).astype(np.float32) + rng.normal(0, 4, (H, W, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def make_inputs(out, n):
    images = photo_crops(n)
    origin = "crops of ../shared/testdata/bge-vl-demo"
    if images is None:
        images = synthetic(n)
        origin = "synthetic scenes"
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    total = 0
    for k, im in enumerate(images):
        p = os.path.join(img_dir, f"img_{k:02d}.jpg")
        im.save(p, "JPEG", quality=90, subsampling="4:2:0")
        total += os.path.getsize(p)
    with open(os.path.join(out, "texts.txt"), "w", encoding="utf-8") as f:
        for k in range(n):
            f.write(CAPTIONS[k % len(CAPTIONS)] + "\n")
    print(f"{n} {W}x{H} JPEGs ({origin}, mean {total / n / 1024:.0f} KiB) and {n} captions in {out}")


def load_inputs(inputs):
    img_dir = os.path.join(inputs, "images")
    names = sorted(f for f in os.listdir(img_dir) if f.endswith(".jpg"))
    jpegs = []
    for name in names:
        with open(os.path.join(img_dir, name), "rb") as f:
            jpegs.append(f.read())
    with open(os.path.join(inputs, "texts.txt"), encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    if not jpegs or not texts:
        sys.exit(f"no images or texts in {inputs}: run `bench_reference.py inputs --out {inputs}`")
    return jpegs, texts


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------

def cycle(items, n):
    return [items[k % len(items)] for k in range(n)]


def timed(fn, reps, warmup):
    """Runs fn() warmup + reps times; fn returns a dict of phase -> seconds.
    Returns per-phase lists over the timed reps."""
    for _ in range(warmup):
        fn()
    out = {}
    for _ in range(reps):
        for k, v in fn().items():
            out.setdefault(k, []).append(v)
    return out


def summary(samples, batch):
    med = statistics.median(samples)
    return {"batch": batch, "reps": len(samples), "median_s": med,
            "min_s": min(samples), "max_s": max(samples), "per_s": batch / med}


def run(args):
    import torch
    import transformers
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    jpegs, texts = load_inputs(args.inputs)
    t0 = time.perf_counter()
    model = CLIPModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    text_batch_sizes = [int(b) for b in (args.text_batch_sizes or args.batch_sizes).split(",") if b]
    result = {
        "tool": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "model": os.path.abspath(args.model),
        "load_s": load_s,
        "reps": args.reps,
        "warmup": args.warmup,
        "precisions": {},
    }

    for precision in [p for p in args.precisions.split(",") if p]:
        if precision == "f32":
            def ctx():
                return torch.autocast("cpu", enabled=False)
        elif precision == "bf16":
            def ctx():
                return torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            sys.exit(f"unknown precision {precision!r}")
        res = {"image": {}, "image_forward": {}, "image_preprocess": {}, "text": {}}

        for b in batch_sizes:
            batch = cycle(jpegs, b)

            def image_step(batch=batch):
                t_a = time.perf_counter()
                pil = [Image.open(io.BytesIO(j)) for j in batch]
                pv = processor(images=pil, return_tensors="pt")["pixel_values"]
                t_b = time.perf_counter()
                with torch.inference_mode(), ctx():
                    emb = model.get_image_features(pixel_values=pv)
                emb.float().sum().item()
                t_c = time.perf_counter()
                return {"total": t_c - t_a, "forward": t_c - t_b, "preprocess": t_b - t_a}

            s = timed(image_step, args.reps, args.warmup)
            res["image"][str(b)] = summary(s["total"], b)
            res["image_forward"][str(b)] = summary(s["forward"], b)
            res["image_preprocess"][str(b)] = summary(s["preprocess"], b)
            print(f"pytorch {precision} images b={b}: {res['image'][str(b)]['per_s']:.2f}/s "
                  f"(forward only {res['image_forward'][str(b)]['per_s']:.2f}/s)", file=sys.stderr)

        for b in text_batch_sizes:
            tb = cycle(texts, b)

            def text_step(tb=tb):
                t_a = time.perf_counter()
                enc = processor(text=tb, padding=True, truncation=True, max_length=77,
                                return_tensors="pt")
                with torch.inference_mode(), ctx():
                    emb = model.get_text_features(input_ids=enc["input_ids"],
                                                  attention_mask=enc["attention_mask"])
                emb.float().sum().item()
                return {"total": time.perf_counter() - t_a}

            # texts are cheap: more repetitions for a stable median
            s = timed(text_step, max(args.reps, 5) * 2, args.warmup + 1)
            res["text"][str(b)] = summary(s["total"], b)
            print(f"pytorch {precision} texts b={b}: {res['text'][str(b)]['per_s']:.1f}/s",
                  file=sys.stderr)

        def one_text():
            t_a = time.perf_counter()
            enc = processor(text=[texts[0]], padding=True, truncation=True, max_length=77,
                            return_tensors="pt")
            with torch.inference_mode(), ctx():
                emb = model.get_text_features(input_ids=enc["input_ids"],
                                              attention_mask=enc["attention_mask"])
            emb.float().sum().item()
            return {"total": time.perf_counter() - t_a}

        s = timed(one_text, args.text_latency_reps, 3)["total"]
        res["text_latency_ms"] = {"p50": statistics.median(s) * 1e3,
                                  "min": min(s) * 1e3, "reps": len(s)}
        print(f"pytorch {precision} one short text: {res['text_latency_ms']['p50']:.1f} ms",
              file=sys.stderr)
        result["precisions"][precision] = res

    doc = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(doc + "\n")
    else:
        print(doc)


# --------------------------------------------------------------------------------------
# threads of a process
# --------------------------------------------------------------------------------------

def threads(pid, out):
    tick = os.sysconf("SC_CLK_TCK")
    rows = []
    base = f"/proc/{pid}/task"
    for tid in sorted(os.listdir(base), key=int):
        try:
            with open(f"{base}/{tid}/stat") as f:
                stat = f.read()
            with open(f"{base}/{tid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # the thread ended meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        rows.append({
            "tid": int(tid),
            "name": comm,
            "cpu_s": (int(fields[11]) + int(fields[12])) / tick,
            "voluntary_switches": int(status["voluntary_ctxt_switches"].strip()),
            "involuntary_switches": int(status["nonvoluntary_ctxt_switches"].strip()),
        })
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    process_cpu_s = (int(fields[11]) + int(fields[12])) / tick  # live and exited threads
    with open(out, "w") as f:
        json.dump({"pid": pid, "time": time.time(), "process_cpu_s": process_cpu_s,
                   "threads": rows}, f, indent=1)


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

BUSY_OTHERS = 0.15   # cores other processes took during a stage: above, results are preliminary
BUSY_LOAD = 0.5      # the same for the 1-minute load average, for runs without the idle window


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fmt(v, digits=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    return str(v)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _thread_groups(before, after):
    """Per thread-name CPU seconds and involuntary switches between two snapshots."""
    if not before or not after:
        return []
    prev = {t["tid"]: t for t in before["threads"]}
    groups = {}
    for t in after["threads"]:
        p = prev.get(t["tid"], {"cpu_s": 0.0, "involuntary_switches": 0, "voluntary_switches": 0})
        g = groups.setdefault(t["name"], {"threads": 0, "busy": 0, "cpu_s": 0.0, "inv": 0, "vol": 0,
                                          "max_cpu_s": 0.0})
        d = t["cpu_s"] - p["cpu_s"]
        g["threads"] += 1
        g["busy"] += d > 0.05
        g["cpu_s"] += d
        g["max_cpu_s"] = max(g["max_cpu_s"], d)
        g["inv"] += t["involuntary_switches"] - p["involuntary_switches"]
        g["vol"] += t["voluntary_switches"] - p["voluntary_switches"]
    if "process_cpu_s" in before and "process_cpu_s" in after:
        live = sum(g["cpu_s"] for g in groups.values())
        gone = after["process_cpu_s"] - before["process_cpu_s"] - live
        ended = len(set(prev) - {t["tid"] for t in after["threads"]})
        if gone > 0.05 or ended:
            groups["(threads that ended meanwhile)"] = {
                "threads": ended, "busy": ended, "cpu_s": max(gone, 0.0), "inv": None,
                "vol": None, "max_cpu_s": None}
    return sorted(groups.items(), key=lambda kv: -kv[1]["cpu_s"])


def _batches_formed(run):
    """Mean batch size per scenario, from the before-/after- marks in batches.txt."""
    marks = {}
    try:
        with open(os.path.join(run, "batches.txt")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    marks[parts[0]] = (float(parts[1]), float(parts[2]))
    except OSError:
        return {}
    out = {}
    for name, (c1, s1) in marks.items():
        if not name.startswith("after-"):
            continue
        label = name[len("after-"):]
        c0, s0 = marks.get("before-" + label, (None, None))
        if c0 is not None and c1 > c0:
            out[label] = (s1 - s0) / (c1 - c0)
    return out


def _nearest(sizes, mean):
    """The measured batch size nearest to `mean` (None without one)."""
    if mean is None or not sizes:
        return None
    return min(sizes, key=lambda b: abs(b - mean))


def render(run):
    meta = {}
    with open(os.path.join(run, "meta.txt")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                meta[k] = v
    kind = meta.get("kind", "base")
    model = _read_json(os.path.join(run, "model.json")) or {}
    ref = _read_json(os.path.join(run, "reference.json")) or {}
    vl_dtype = meta.get("dtype", "f32")
    vl = _get(model, "precisions", vl_dtype) or {}
    pt32 = _get(ref, "precisions", "f32") or {}
    pt16 = _get(ref, "precisions", "bf16") or {}
    batches = [int(b) for b in meta.get("batches", "1,8,32").split(",") if b]
    text_batches = [int(b) for b in meta.get("text_batches", meta.get("batches", "1,8,32")).split(",")
                    if b]
    formed = _batches_formed(run)

    # CPU taken by other processes, per stage
    tick = os.sysconf("SC_CLK_TCK")
    marks = []
    try:
        with open(os.path.join(run, "cpu.txt")) as f:
            for line in f:
                name, busy, ours, t, load = line.split()
                marks.append((name, int(busy), int(ours), float(t), float(load)))
    except OSError:
        pass
    stages = []
    for (n0, b0, o0, t0, _), (n1, b1, o1, t1, l1) in zip(marks, marks[1:]):
        dt = max(t1 - t0, 1e-9)
        others = max(0.0, ((b1 - b0) - (o1 - o0)) / tick / dt)
        stages.append((n1, dt, others, l1))
    load_start = float(meta.get("load_at_start", "0 0 0").split()[0])
    measured = [s for s in stages if s[0] not in ("server-ready", "end")]
    worst = max((s[2] for s in measured), default=0.0)
    # Without the idle window (older runs), fall back on the load average.
    has_idle = any(s[0] == "idle-5s" for s in stages)
    busy = worst > BUSY_OTHERS or (not has_idle and load_start > BUSY_LOAD)

    out = []
    title = (f"BGE-VL-{kind} (random weights, real architecture), {meta.get('mode', '?')} run, "
             f"vlembed in {vl_dtype}")
    out.append(f"### {title}")
    out.append("")
    if busy:
        out.append(f"**PRELIMINARY: the machine was busy** (other processes took up to "
                   f"{worst:.2f} of its cores during a stage; 1-min load average {load_start:.2f} "
                   "at the start). Rerun on a quiet machine for numbers to quote.")
        out.append("")
    dirty = int(meta.get("dirty", "0") or 0)
    out.append(f"- command: `{meta.get('command', '?')}`, {meta.get('date', '?')}, "
               f"{int(meta.get('elapsed_s', '0')) / 60:.1f} min")
    out.append(f"- commit {meta.get('commit', '?')}"
               + (f" plus {dirty} uncommitted changed files" if dirty else "")
               + f"; {meta.get('rustc', '')}")
    out.append(f"- CPU: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, "
               f"{meta.get('mem_gib', '?')} GiB; candle threads {model.get('threads', '?')}"
               f" (RAYON_NUM_THREADS={meta.get('rayon_num_threads') or 'unset'}), "
               f"torch threads {ref.get('threads', '–')}"
               + (f" (torch {ref['torch']}, transformers {ref['transformers']})" if ref else ""))
    out.append(f"- load average at start {meta.get('load_at_start', '?')}; CPU taken by other "
               "processes (cores, average): "
               + ", ".join(f"{n} {o:.2f}" for n, _, o, _ in stages))
    info = _read_json(os.path.join(run, "info.json")) or {}
    chosen = (_get(info, "models") or [{}])[0].get("cpu_backend") or {}
    onednn = next((c.get("onednn") for c in
                   ((_read_json(os.path.join(run, f"model-{b}.json")) or {}).get("cpu_backend") or {}
                    for b in meta.get("backends", "").split()) if c.get("onednn")), None)
    out.append(f"- CPU backends: model alone on {', '.join(meta.get('backends', 'native').split())}"
               + (f" ({onednn})" if onednn else "")
               + f"; the server ran `--cpu-backend {meta.get('server_backend', 'auto')}` and used "
               f"**{chosen.get('backend', meta.get('server_backend_chosen', '?'))}**"
               + (f" ({chosen['reason']})" if chosen.get("reason") else "")
               + "; the \"vlembed\" columns below are that backend"
               + (f"; OMP_WAIT_POLICY={meta['omp_wait_policy']}" if meta.get("omp_wait_policy") else ""))
    out.append(f"- inputs: 640x480 JPEGs (quality 90), short captions; figures are medians of "
               f"{meta.get('reps', '?')} repetitions after {meta.get('warmup', '?')} warm-up "
               f"(texts: twice as many)")
    out.append("")

    # model alone
    out.append("#### Model alone (one thread calling the library; no HTTP)")
    out.append("")
    out.append("| measure | batch | vlembed | PyTorch f32 | PyTorch bf16 autocast "
               "| vlembed ÷ PyTorch f32 | vlembed ÷ PyTorch bf16 |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("images/s, preprocessing included", "image", batches),
            ("images/s, forward only", "image_forward", batches),
            ("texts/s (tokenize + forward)", "text", text_batches)]
    for label, key, sizes in rows:
        for b in sizes:
            v = _get(vl, key, str(b), "per_s")
            a = _get(pt32, key, str(b), "per_s")
            c = _get(pt16, key, str(b), "per_s")
            out.append(f"| {label} | {b} | {_fmt(v)} | {_fmt(a)} | {_fmt(c)} "
                       f"| {_fmt(_ratio(v, a))} | {_fmt(_ratio(v, c))} |")
    for b in batches:
        v = _get(vl, "image_preprocess", str(b), "median_s")
        a = _get(pt32, "image_preprocess", str(b), "median_s")
        c = _get(pt16, "image_preprocess", str(b), "median_s")
        v, a, c = (x * 1e3 / b if x is not None else None for x in (v, a, c))
        out.append(f"| preprocessing, ms per image (one thread) | {b} | {_fmt(v)} | {_fmt(a)} "
                   f"| {_fmt(c)} | {_fmt(_ratio(a, v))} | {_fmt(_ratio(c, v))} |")
    v = _get(vl, "text_latency_ms", "p50")
    a = _get(pt32, "text_latency_ms", "p50")
    c = _get(pt16, "text_latency_ms", "p50")
    out.append(f"| one short text, ms (median) | 1 | {_fmt(v)} | {_fmt(a)} | {_fmt(c)} "
               f"| {_fmt(_ratio(a, v))} | {_fmt(_ratio(c, v))} |")
    out.append("")
    out.append("Ratios above 1 mean vlembed is faster (for times: PyTorch's time ÷ vlembed's).")
    out.append("")

    # model alone per CPU backend
    per = [(b, _get(_read_json(os.path.join(run, f"model-{b}.json")) or {}, "precisions", vl_dtype) or {})
           for b in meta.get("backends", "").split()]
    if len(per) > 1:
        out.append(f"#### Model alone per CPU backend ({vl_dtype})")
        out.append("")
        out.append("| measure | batch | " + " | ".join(b for b, _ in per)
                   + " | " + " | ".join(f"{b} ÷ {per[0][0]}" for b, _ in per[1:]) + " |")
        out.append("|---|---:|" + "---:|" * (2 * len(per) - 1))
        for label, key, sizes in rows:
            for b in sizes:
                vals = [_get(d, key, str(b), "per_s") for _, d in per]
                out.append(f"| {label} | {b} | " + " | ".join(_fmt(v) for v in vals) + " | "
                           + " | ".join(_fmt(_ratio(v, vals[0])) for v in vals[1:]) + " |")
        out.append("")

    # server
    out.append("#### Server end to end (`POST /embed`, one image per request, keep-alive, loopback)")
    out.append("")
    out.append(f"Closed loop: N clients each send one request at a time for {meta.get('load_s', '?')} s, "
               "then the requests in flight finish; the load generator runs on the same cores.")
    out.append("")
    out.append("Mean batch: the batches the server formed (its `vlembed_batch_size` histogram); "
               "\"÷ model\": images/s ÷ the model alone (preprocessing included) at the measured "
               "batch size nearest to it.")
    out.append("")
    out.append("| clients | requests | ok | errors | images/s | p50 ms | p95 ms | p99 ms | max ms "
               "| mean batch | ÷ model | load generator CPU, cores |")
    out.append("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    levels = sorted(int(f[len("server-c"):-5]) for f in os.listdir(run)
                    if f.startswith("server-c") and f.endswith(".json"))
    server = {}
    for n in levels:
        r = _read_json(os.path.join(run, f"server-c{n}.json")) or {}
        m = r.get("main", {})
        server[n] = m
        lat = m.get("latency_ms", {})
        errs = ", ".join(f"{k}: {v}" for k, v in (m.get("errors") or {}).items()) or "0"
        mean = formed.get(f"images-c{n}")
        near = _nearest(batches, mean)
        alone = _get(vl, "image", str(near), "per_s") if near else None
        out.append(f"| {n} | {m.get('requests', '–')} | {m.get('ok', '–')} | {errs} "
                   f"| {_fmt(m.get('throughput_per_s'))} | {_fmt(lat.get('p50'))} "
                   f"| {_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} | {_fmt(lat.get('max'))} "
                   f"| {_fmt(mean)} | {_fmt(_ratio(m.get('throughput_per_s'), alone))} "
                   f"| {_fmt(_get(r, 'client_cpu', 'cores'))} |")
    out.append("")
    if levels:
        top = max(levels)
        big = _nearest(batches, formed.get(f"images-c{top}")) or max(batches)
        s = _get(server, top, "throughput_per_s")
        m = _get(vl, "image", str(big), "per_s")
        if s is not None and m is not None:
            errs = sum((_get(server, top, "errors") or {}).values())
            best = max(levels, key=lambda n: _get(server, n, "throughput_per_s") or 0)
            out.append(f"Server overhead: {top} concurrent clients sending single images reach "
                       f"{_fmt(s)} images/s"
                       + (f" ({errs} of their requests failed)" if errs else "")
                       + f"; the same images embedded offline in batches of {big} "
                       f"(model alone, preprocessing included) {_fmt(m)} images/s: the server "
                       f"delivers {100 * s / m:.0f}% of the offline throughput (best: "
                       f"{_fmt(_get(server, best, 'throughput_per_s'))} images/s = "
                       f"{100 * (_get(server, best, 'throughput_per_s') or 0) / m:.0f}% with "
                       f"{best} client{'s' if best != 1 else ''}).")
            out.append("")

    # texts
    tc = meta.get("text_clients", "32")
    tr = _read_json(os.path.join(run, f"texts-c{tc}.json"))
    if tr:
        m = tr.get("main", {})
        lat = m.get("latency_ms", {})
        errs = ", ".join(f"{k}: {v}" for k, v in (m.get("errors") or {}).items()) or "0"
        mean = formed.get(f"texts-c{tc}")
        near = _nearest(text_batches, mean)
        tps = m.get("throughput_per_s")
        alone = _get(vl, "text", str(near), "per_s") if near else None
        # The model alone measured just before and after this phase, when
        # there (see bench.sh: text_model_mark).
        brackets = []
        for when in ("before", "after"):
            d = _read_json(os.path.join(run, f"model-texts-{when}.json")) or {}
            for b, r in (_get(d, "precisions", vl_dtype, "text") or {}).items():
                brackets.append((int(b), r.get("per_s")))
        bracket_b = sorted({b for b, _ in brackets})
        bnear = _nearest(bracket_b, mean)
        around = [v for b, v in brackets if b == bnear and v]
        if around:
            near, alone = bnear, sum(around) / len(around)
        p32 = _get(pt32, "text", str(near), "per_s") if near else None
        p16 = _get(pt16, "text", str(near), "per_s") if near else None
        out.append(f"#### Server end to end, texts ({tc} clients, one short text per request)")
        out.append("")
        out.append(f"Closed loop as above. \"÷ model\": texts/s ÷ the model alone (tokenize + "
                   f"forward) at batch {near if near else '?'}, the measured size nearest to the "
                   "mean batch the server formed"
                   + (f", measured just before and after this phase ({' and '.join(_fmt(v) for v in around)}"
                      " texts/s; the machine's speed drifts between stages)" if around else "")
                   + "; the same for PyTorch (in-process batching, from the table above).")
        out.append("")
        out.append("| texts/s | errors | p50 ms | p99 ms | mean batch | ÷ model | ÷ PyTorch f32 "
                   "| ÷ PyTorch bf16 | load generator CPU, cores |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        out.append(f"| {_fmt(tps)} | {errs} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p99'))} "
                   f"| {_fmt(mean)} | {_fmt(_ratio(tps, alone))} | {_fmt(_ratio(tps, p32))} "
                   f"| {_fmt(_ratio(tps, p16))} | {_fmt(_get(tr, 'client_cpu', 'cores'))} |")
        out.append("")

    # mixed
    idle = _read_json(os.path.join(run, "text-idle.json")) or {}
    mixed = sorted(int(f[len("mixed-c"):-5]) for f in os.listdir(run)
                   if f.startswith("mixed-c") and f.endswith(".json"))
    out.append("#### Text latency while images are served (mixed)")
    out.append("")
    out.append(f"A query client sends single short texts one after the other (pausing "
               f"{meta.get('query_interval_ms', '100')} ms; 50 ms when idle; no `priority` given, so "
               "they are `high` by default) while N image clients keep the server busy. "
               "\"÷ alone\": images/s under the mix ÷ images/s of the same N clients alone.")
    out.append("")
    out.append("| image clients | images/s | ÷ alone | texts sent | text errors | text p50 ms "
               "| text p95 ms | text p99 ms | text max ms | load generator CPU, cores |")
    out.append("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    rows = [(0, idle)] + [(n, _read_json(os.path.join(run, f"mixed-c{n}.json")) or {}) for n in mixed]
    for n, r in rows:
        p = r.get("probe", {})
        lat = p.get("latency_ms", {})
        errs = ", ".join(f"{k}: {v}" for k, v in (p.get("errors") or {}).items()) or "0"
        ips = _get(r, "main", "throughput_per_s")
        alone = _get(server, n, "throughput_per_s") if n else None
        out.append(f"| {n} | {_fmt(ips) if n else '–'} | {_fmt(_ratio(ips, alone)) if n else '–'} "
                   f"| {p.get('requests', '–')} | {errs} "
                   f"| {_fmt(lat.get('p50'))} | {_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} "
                   f"| {_fmt(lat.get('max'))} | {_fmt(_get(r, 'client_cpu', 'cores'))} |")
    out.append("")

    # memory
    weights = int(meta.get("weights_bytes", "0") or 0)
    rss = {}
    try:
        with open(os.path.join(run, "rss.txt")) as f:
            for line in f:
                parts = line.split()
                rss[parts[0]] = {k: int(v) for k, v in (p.split("=") for p in parts[1:])}
    except OSError:
        pass
    if rss and weights:
        def mib(key, kb_key):
            return rss.get(key, {}).get(kb_key, 0) / 1024
        peak = max(v.get("VmHWM_kB", 0) for v in rss.values()) * 1024
        out.append("#### Memory of the server")
        out.append("")
        out.append(f"Weights (safetensors, f32): {weights / 2**20:.0f} MiB. Peak RSS (VmHWM): "
                   f"{mib('ready', 'VmHWM_kB'):.0f} MiB once ready, {peak / 2**20:.0f} MiB at the end "
                   f"= {peak / weights:.2f}x the weights.")
        out.append("")
        out.append("| when | VmHWM MiB | VmRSS MiB | RssAnon MiB | RssFile MiB |")
        out.append("|---|---:|---:|---:|---:|")
        for k in rss:
            out.append(f"| {k} | {mib(k, 'VmHWM_kB'):.0f} | {mib(k, 'VmRSS_kB'):.0f} "
                       f"| {mib(k, 'RssAnon_kB'):.0f} | {mib(k, 'RssFile_kB'):.0f} |")
        out.append("")

    # threads
    groups = _thread_groups(_read_json(os.path.join(run, "threads-before.json")),
                            _read_json(os.path.join(run, "threads-after.json")))
    if groups:
        total = sum(g["cpu_s"] for _, g in groups) or 1.0
        out.append("#### Server threads during the single-image scenarios")
        out.append("")
        out.append("| thread name | threads | busy | CPU s | share | max CPU s of one | "
                   "involuntary switches | voluntary switches |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, g in groups:
            out.append(f"| `{name}` | {g['threads']} | {g['busy']} | {g['cpu_s']:.1f} "
                       f"| {100 * g['cpu_s'] / total:.0f}% | {_fmt(g['max_cpu_s'], 1)} "
                       f"| {_fmt(g['inv'])} | {_fmt(g['vol'])} |")
        out.append("")
        out.append("Tokio names its async workers and its blocking (preprocessing) threads alike "
                   "(`vlembed-http`); its blocking threads end after 10 s idle, so preprocessing "
                   "shows up mostly as threads that ended. Rayon's pool threads inherit the "
                   "name of the thread that first used them (the model worker, "
                   "`vlembed-worker-`, truncated to 15 characters by Linux). Involuntary "
                   "switches = preemptions.")
        out.append("")
    # Each (model, dtype, CPU kind) has its own section in BENCHMARKS.md.
    key = kind if vl_dtype == "f32" else f"{kind}-{vl_dtype}"
    if meta.get("cpu_key"):
        key += ":" + meta["cpu_key"]
    return key, "\n".join(out) + "\n", busy


def report(run, out_path, update):
    kind, text, busy = render(run)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
    print(text)
    if update:
        begin, end = f"<!-- bench:{kind}:begin -->", f"<!-- bench:{kind}:end -->"
        try:
            with open(update) as f:
                doc = f.read()
        except OSError:
            doc = "# Benchmarks\n"
        block = f"{begin}\n{text}{end}"
        if begin in doc and end in doc:
            doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        with open(update + ".tmp", "w") as f:
            f.write(doc)
        os.replace(update + ".tmp", update)
        print(f"updated {update} ({'preliminary' if busy else 'quiet machine'})", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("inputs", help="write the benchmark's JPEGs and captions")
    a.add_argument("--out", required=True)
    a.add_argument("--n", type=int, default=32)
    r = sub.add_parser("run", help="measure transformers' CLIPModel on the inputs")
    r.add_argument("--model", required=True)
    r.add_argument("--inputs", required=True)
    r.add_argument("--batch-sizes", default="1,8,32")
    r.add_argument("--text-batch-sizes", help="batch sizes of the text measurements "
                   "(default: --batch-sizes)")
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--text-latency-reps", type=int, default=50)
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    r.add_argument("--precisions", default="f32,bf16")
    r.add_argument("--json")
    t = sub.add_parser("threads", help="snapshot the threads of a process")
    t.add_argument("--pid", type=int, required=True)
    t.add_argument("--json", required=True)
    p = sub.add_parser("report", help="render a scripts/bench.sh run as Markdown")
    p.add_argument("--run", required=True, help="the run's folder (WORK/run-KIND)")
    p.add_argument("--out", help="write the Markdown here")
    p.add_argument("--update", help="replace this model's section of this file (BENCHMARKS.md)")
    args = ap.parse_args()
    if args.cmd == "inputs":
        make_inputs(args.out, args.n)
    elif args.cmd == "threads":
        threads(args.pid, args.json)
    elif args.cmd == "report":
        report(args.run, args.out, args.update)
    else:
        run(args)


if __name__ == "__main__":
    main()
