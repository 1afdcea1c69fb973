// minidiff's page: plain JavaScript, no library, no CDN. It speaks the same AUTOMATIC1111 API as
// any other client: /sdapi/v1/txt2img (or img2img with a picture and a painted mask), with the
// progress bar fed by /sdapi/v1/progress while the request runs.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_PICTURE_SIDE = 1024; // the picture is drawn on a canvas at most this wide before it is sent
let busy = false;
let painted = false;

function authHeaders() {
  const token = $("token").value.trim();
  if (!token) return {};
  // "user:password" is AUTOMATIC1111's --api-auth (basic); anything else is a --token (Bearer).
  return { Authorization: token.includes(":") ? "Basic " + btoa(token) : "Bearer " + token };
}

async function api(path, body) {
  const init = { headers: { ...authHeaders() } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) $("token-row").hidden = false;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error((data && data.detail) || response.status + " " + response.statusText);
  return data;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadLists() {
  try {
    const [models, samplers, options] = await Promise.all(
      [api("/sdapi/v1/sd-models"), api("/sdapi/v1/samplers"), api("/sdapi/v1/options")]);
    $("model").replaceChildren(...models.map((m) => new Option(m.model_name, m.title, false,
      m.title === options.sd_model_checkpoint)));
    $("sampler").replaceChildren(new Option("the model's", ""),
      ...samplers.map((s) => new Option(s.name, s.name)));
    status("ready");
  } catch (error) {
    status(error.message, true);
  }
}

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function request() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    seed: numberOrNull("seed") ?? -1,
    batch_size: numberOrNull("count") ?? 1,
    n_iter: 1,
    override_settings: { sd_model_checkpoint: $("model").value },
  };
  if (numberOrNull("steps") !== null) body.steps = numberOrNull("steps");
  if (numberOrNull("cfg") !== null) body.cfg_scale = numberOrNull("cfg");
  if ($("sampler").value) body.sampler_name = $("sampler").value;
  if (!$("picture-canvas").width || $("drop-picture").disabled) return ["/sdapi/v1/txt2img", body];
  body.init_images = [$("picture-canvas").toDataURL("image/png")];
  body.denoising_strength = Number($("strength").value);
  if (painted) body.mask = $("mask-canvas").toDataURL("image/png");
  return ["/sdapi/v1/img2img", body];
}

async function watchProgress() {
  while (busy) {
    try {
      const p = await api("/sdapi/v1/progress");
      $("progress").value = p.progress;
      if (p.current_image) {
        $("preview").src = "data:image/png;base64," + p.current_image;
        $("preview").hidden = false;
      }
      if (p.state && p.state.sampling_steps) status(`step ${p.state.sampling_step} of ${p.state.sampling_steps}`);
    } catch (error) { /* the answer to the job itself reports errors */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function addToGallery(b64, seed, infotext) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = infotext;
  img.title = infotext;
  const caption = document.createElement("figcaption");
  const link = document.createElement("a");
  link.href = img.src;
  link.download = `minidiff-${seed}.png`;
  link.textContent = "download PNG";
  caption.append(`seed ${seed}`, link);
  figure.append(img, caption);
  $("gallery").prepend(figure);
}

async function generate(event) {
  event.preventDefault();
  if (busy) return;
  busy = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  status("drawing...");
  const [path, body] = request();
  const progress = watchProgress();
  try {
    const answer = await api(path, body);
    const info = JSON.parse(answer.info);
    answer.images.slice().reverse().forEach((b64, i) => {
      const k = answer.images.length - 1 - i;
      addToGallery(b64, info.all_seeds[k], info.infotexts[k]);
    });
    $("progress").value = 1;
    status(info.notes && info.notes.length ? info.notes.join("; ") : `${answer.images.length} picture(s)`);
  } catch (error) {
    status(error.message, true);
  } finally {
    busy = false;
    await progress;
    $("preview").hidden = true;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

// -- img2img: the picture on one canvas, the mask painted on another of the same size -----------
function loadPicture(file) {
  const image = new Image();
  image.onload = () => {
    const scale = Math.min(1, MAX_PICTURE_SIDE / Math.max(image.width, image.height));
    const width = Math.max(1, Math.round(image.width * scale));
    const height = Math.max(1, Math.round(image.height * scale));
    for (const canvas of [$("picture-canvas"), $("mask-canvas")]) {
      canvas.width = width;
      canvas.height = height;
    }
    $("picture-canvas").getContext("2d").drawImage(image, 0, 0, width, height);
    clearMask();
    $("drop-picture").disabled = false;
    URL.revokeObjectURL(image.src);
  };
  image.onerror = () => status("that file is not a picture this browser can read", true);
  image.src = URL.createObjectURL(file);
}

function clearMask() {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, canvas.width, canvas.height);
  painted = false;
}

function paint(event) {
  if (!(event.buttons & 1)) return;
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const radius = Number($("brush").value) * canvas.width / box.width / 2;
  const context = canvas.getContext("2d");
  context.fillStyle = "white";
  context.beginPath();
  context.arc(x, y, Math.max(0.5, radius), 0, 2 * Math.PI);
  context.fill();
  painted = true;
}

function dropPicture() {
  $("picture").value = "";
  for (const canvas of [$("picture-canvas"), $("mask-canvas")]) canvas.width = canvas.height = 0;
  $("drop-picture").disabled = true;
  painted = false;
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(() => {}));
$("picture").addEventListener("change", (e) => e.target.files[0] && loadPicture(e.target.files[0]));
$("strength").addEventListener("input", (e) => { $("strength-shown").value = e.target.value; });
$("mask-canvas").addEventListener("pointerdown", paint);
$("mask-canvas").addEventListener("pointermove", paint);
$("clear-mask").addEventListener("click", clearMask);
$("drop-picture").addEventListener("click", dropPicture);
$("token").addEventListener("change", loadLists);
$("drop-picture").disabled = true;
loadLists();
