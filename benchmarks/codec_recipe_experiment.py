"""The codec-recipe experiment behind docs/mini_world.md's "How it was found" table (valid split only).

    python benchmarks/codec_recipe_experiment.py A 1000 /tmp/A 0.0                      # unquantized AE, linear mel
    python benchmarks/codec_recipe_experiment.py B 500 /tmp/B 0.0 0.99 0.01 2e-3 /tmp/A.safetensors   # EMA codebooks, encoder trains
    python benchmarks/codec_recipe_experiment.py C 1000 /tmp/C 0.3 0.99 0.01 2e-3 /tmp/A.safetensors  # decoder only, 0.3 x log-mel

Arguments: mode (A: no quantizer; B: k-means then EMA codebooks with the encoder training; C: k-means
then the decoder alone), steps, output prefix, log-mel weight, EMA decay, dead ratio, lr, and (B, C)
the phase-A weights. Loss: mel L1 (+ weight x log-mel L1) + 10 x L1 + 100 x MSE of the waveform;
batch 8 x 1 s crops of the mini world's train clips (runs/world/render/data); every 500 steps the
chroma correlation (and for B/C the codec figures) on 24 valid clips.
"""
import sys, time, json, dataclasses, math
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import numpy as np, torch, torch.nn.functional as F
from musicgen import flush_denormals
from musicgen.config import preset
from musicgen.world import split_audio
from musicgen.models.codec import build_codec, kmeans_init, rvq_train_forward
from musicgen.train.objectives import SpectralLoss
from musicgen.eval.codec import evaluate_codec
from musicgen.eval.music import chroma_correlation

torch.set_num_threads(2)
torch.set_flush_denormal(True)
mode = sys.argv[1]          # A, B or C
steps = int(sys.argv[2])
out = sys.argv[3]
log_w = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
decay = float(sys.argv[5]) if len(sys.argv) > 5 else 0.99
dead = float(sys.argv[6]) if len(sys.argv) > 6 else 0.01
lr = float(sys.argv[7]) if len(sys.argv) > 7 else 2e-3
p = preset("mini")
cfg = p.world.codec
root = str(ROOT / "runs/world/render/data")
train, _ = split_audio(root, "train", 8000)
valid, vclips = split_audio(root, "valid", 8000, limit=24)
model = build_codec(cfg, seed=0)
if mode in "BC":
    from safetensors.torch import load_file
    model.load_state_dict(load_file(sys.argv[8]))
spec = SpectralLoss(8000, mel_ffts=cfg.mel_ffts, mel_bands=cfg.mel_bands, log_weight=log_w)
opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
g = torch.Generator().manual_seed(0)
crop = 8000
def ae_eval():
    model.eval()
    with torch.no_grad():
        y = model.decoder(model.encoder(valid[:, None, :]))[:, 0, : valid.shape[1]]
    model.train()
    x, y = valid.numpy(), y.numpy()
    cc = np.mean([chroma_correlation(x[i], y[i], 8000) for i in range(len(x))])
    rms = float(np.sqrt((y**2).mean()) / np.sqrt((x**2).mean()))
    return round(float(cc), 3), round(rms, 3)
if mode in "BC":
    pick = torch.randperm(len(train), generator=g)[:48]
    with torch.no_grad():
        z = model.encoder(train[pick][:, None, :])
    print("kmeans residual", kmeans_init(model, z.permute(0, 2, 1).reshape(-1, z.shape[1]), seed=0), flush=True)
    f = evaluate_codec(model, valid, sample_rate=8000, codebook_size=cfg.codebook_size, notes=[c.meta.get("notes") for c in vclips])
    print("B start", json.dumps(f), flush=True)
t0 = time.time(); restarts = 0
for step in range(steps + 1):
    if step % 500 == 0:
        if mode == "A":
            print(step, "ae chroma/rms", ae_eval(), f"{time.time()-t0:.0f}s", flush=True)
        elif step:
            f = evaluate_codec(model, valid, sample_rate=8000, codebook_size=cfg.codebook_size, notes=[c.meta.get("notes") for c in vclips])
            print(step, "restarts", restarts, json.dumps(f), f"{time.time()-t0:.0f}s", flush=True)
            print("   ae", ae_eval(), flush=True)
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.safetensors")
    if step == steps:
        break
    idx = torch.randint(len(train), (8,), generator=g)
    xs = []
    for i in idx:
        o = int(torch.randint(train.shape[1] - crop + 1, (1,), generator=g))
        xs.append(train[i, o:o + crop] * torch.empty(1).uniform_(0.3, 1.0, generator=g))
    x = torch.stack(xs)
    commit = x.new_zeros(())
    if mode == "C":
        with torch.no_grad():
            z, _, _, _ = rvq_train_forward(model, model.encoder(x[:, None, :]), train=False)
    else:
        z = model.encoder(x[:, None, :])
    if mode == "B":
        z, commit, _, r = rvq_train_forward(model, z, train=True, decay=decay, dead_ratio=dead, generator=g)
        restarts += r
    y = model.decoder(z)[:, 0, :crop]
    warm = min(1.0, (step + 1) / 50)
    for pg in opt.param_groups: pg["lr"] = lr * warm
    loss = spec(y, x) + 10 * F.l1_loss(y, x) + 100 * F.mse_loss(y, x) + 0.25 * commit
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()
    if step % 100 == 0:
        print(step, "loss", round(float(loss.detach()), 4), flush=True)
