// Load a kdq MusicGen bundle in transformers.js (Node) and generate greedily with guidance 3.
//   npm install --ignore-scripts @huggingface/transformers@3   (the CPU onnxruntime-node binary ships in the package)
//   node examples/musicgen/tjs_check.mjs MODELS_DIR BUNDLE_NAME "a calm piano chorale" 24 out.json
// Writes the audio samples as a JSON array; compare with musicgen.runtime.MusicgenOnnx (docs/export.md).
import { env, AutoTokenizer, MusicgenForConditionalGeneration } from '@huggingface/transformers';
import fs from 'fs';

const [modelsDir, name, prompt, maxNewTokens, out] = process.argv.slice(2);
env.localModelPath = modelsDir.endsWith('/') ? modelsDir : modelsDir + '/';
env.allowRemoteModels = false;
const model = await MusicgenForConditionalGeneration.from_pretrained(name);
const tokenizer = await AutoTokenizer.from_pretrained(name);
const inputs = tokenizer([prompt]);
const audio = await model.generate({ ...inputs, max_new_tokens: Number(maxNewTokens), do_sample: false, guidance_scale: 3 });
fs.writeFileSync(out, JSON.stringify(Array.from(audio.data)));
console.log(JSON.stringify({ dims: audio.dims, type: audio.type }));
