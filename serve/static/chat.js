// The chat page of a bitllava server: images and a question in, the answer streamed out.
//
// Everything goes through this server's own OpenAI-compatible API, as any client would use it:
//   GET health                   -> the served model's name (no auth);
//   GET v1/models                -> 401 tells that the server wants an API key (the key field is shown);
//   POST v1/chat/completions     -> stream: true; images are base64 data URLs in image_url parts.
// The answer is read from the server-sent events as they arrive. A refusal (an OpenAI error body,
// or an error event once the stream has started) is shown with the server's own message.
// Paths are relative, so the page also works under a Serve route prefix.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  model: null,      // the id the server serves (from GET health)
  history: [],      // the conversation so far, as OpenAI messages
  images: [],       // images attached to the next question: {name, url}
  controller: null, // AbortController of the request in flight
};

// ------------------------------------------------------------------ server

function headers() {
  const out = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

// The message of a failed response: the OpenAI error body's message, else the HTTP status.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return `${message} (HTTP ${response.status})`;
  } catch (_) {
    // not an OpenAI error body (a proxy's page, say): fall through
  }
  return `HTTP ${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

// The `data:` payloads of a server-sent event stream, one per event, as they arrive.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

async function init() {
  try {
    const health = await fetch("health");
    if (!health.ok) throw new Error(await errorMessage(health));
    state.model = (await health.json()).model;
    $("model").textContent = state.model;
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
  }
  try {
    const probe = await fetch("v1/models");
    $("key-row").hidden = probe.status !== 401;
  } catch (_) {
    $("key-row").hidden = false;
  }
  const saved = sessionStorage.getItem("bitllava-api-key");
  if (saved) $("api-key").value = saved;
}

// ------------------------------------------------------------------ page

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function thumbnail(url, name) {
  const img = document.createElement("img");
  img.src = url;
  img.alt = name || "image";
  img.title = name || "";
  return img;
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  $("log").append(div);
  return div;
}

function renderPreviews() {
  const box = $("previews");
  box.replaceChildren();
  state.images.forEach((image, i) => {
    const item = document.createElement("span");
    item.className = "preview";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `remove ${image.name}`;
    remove.addEventListener("click", () => {
      state.images.splice(i, 1);
      renderPreviews();
    });
    item.append(thumbnail(image.url, image.name), remove);
    box.append(item);
  });
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError(`${file.name} is not an image`);
      continue;
    }
    state.images.push({ name: file.name, url: await readDataURL(file) });
  }
  renderPreviews();
}

// ------------------------------------------------------------------ asking

function requestBody(userMessage) {
  const body = { model: state.model, messages: [...state.history, userMessage], stream: true };
  const maxTokens = $("max-tokens").value;
  const temperature = $("temperature").value;
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  if (temperature !== "") body.temperature = Number(temperature);
  return body;
}

async function ask(event) {
  event.preventDefault();
  const text = $("question").value.trim();
  if (!text || state.controller) return;
  hideError();
  const images = state.images.slice();
  const content = [...images.map((im) => ({ type: "image_url", image_url: { url: im.url } })),
                   { type: "text", text }];
  const userMessage = { role: "user", content };

  const asked = bubble("user");
  images.forEach((im) => asked.append(thumbnail(im.url, im.name)));
  asked.append(document.createTextNode(text));
  const answer = bubble("assistant");
  answer.classList.add("streaming");

  state.controller = new AbortController();
  setBusy(true);
  sessionStorage.setItem("bitllava-api-key", $("api-key").value.trim());
  let reply = "";
  let finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(userMessage)),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        answer.textContent = reply;
        answer.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (finish === null) throw new Error("the stream ended before the answer was complete");
    answer.dataset.finishReason = finish;
    if (finish === "length") answer.title = "stopped at max tokens";
    state.history.push(userMessage, { role: "assistant", content: reply });
    state.images = [];
    renderPreviews();
    $("question").value = "";
  } catch (err) {
    if (err.name === "AbortError") {  // Stop (or New chat): what came is the turn's answer
      answer.dataset.finishReason = "stopped";
      if (!answer.isConnected) return;  // New chat cleared the conversation
      state.history.push(userMessage, { role: "assistant", content: reply });
      state.images = [];
      renderPreviews();
      $("question").value = "";
    } else {  // the question and images stay in the form, to be fixed and sent again
      asked.classList.add("failed");
      answer.remove();
      showError(err.message);
    }
  } finally {
    answer.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("log").replaceChildren();
  hideError();
}

// ------------------------------------------------------------------ wiring

$("ask").addEventListener("submit", ask);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", newChat);
$("images").addEventListener("change", async (e) => {
  await addFiles(e.target.files);
  e.target.value = "";  // choosing the same file again fires change again
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  addFiles(e.dataTransfer.files);
});
init();
