// The chat page: talks to this server's own /v1/chat/completions with stream=true.
"use strict";

const SETTINGS = JSON.parse(document.getElementById("settings").textContent);
const $ = (id) => document.getElementById(id);

let history = [];          // OpenAI messages sent before the next query (system prompt excluded)
let controller = null;     // AbortController of the reply being streamed
let awaitingToolResult = false;

function init() {
  $("model-name").textContent = `${SETTINGS.model} (${SETTINGS.family})`;
  for (const [key, value] of Object.entries(SETTINGS.defaults)) $(key).value = value;
  $("api-key-field").hidden = !SETTINGS.auth;
  $("tools-field").hidden = SETTINGS.family !== "chatglm3";
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clear);
}

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return body;
}

function note(body, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = ` (${text})`;
  body.parentElement.append(span);
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// ChatGLM's tool list ({name, description, parameters}) or OpenAI's ({type, function}).
function readTools() {
  const text = $("tools").value.trim();
  if (SETTINGS.family !== "chatglm3" || !text) return undefined;
  let tools = JSON.parse(text);  // a SyntaxError is shown to the user by send()
  if (!Array.isArray(tools)) throw new Error("tools must be a JSON list");
  return tools.map((tool) => (tool.type === "function" ? tool : { type: "function", function: tool }));
}

function requestBody(messages) {
  const body = { model: SETTINGS.model, messages, stream: true };
  for (const key of ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed"]) {
    const value = numberField(key);
    if (value !== undefined) body[key] = value;
  }
  const stops = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  if (stops.length) body.stop = stops;
  const tools = readTools();
  if (tools) body.tools = tools;
  return body;
}

// Yields the JSON payload of each `data:` event of a server-sent-events body.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;  // a keep-alive comment
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  const role = awaitingToolResult ? "tool" : "user";
  let body;
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history, [{ role, content: text }]);
  try {
    body = requestBody(messages);
  } catch (error) {
    addMessage("error", `tools: ${error.message}`);
    return;
  }
  $("input").value = "";
  addMessage(role, text);
  const reply = addMessage("assistant", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  let content = "", toolCalls = [], finish = null, failure = null;
  try {
    const headers = { "Content-Type": "application/json" };
    if (SETTINGS.auth) headers.Authorization = `Bearer ${$("api_key").value}`;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(error.error ? error.error.message : response.statusText);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta.content) { content += choice.delta.content; reply.textContent = content; }
      if (choice.delta.tool_calls) toolCalls = toolCalls.concat(choice.delta.tool_calls);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (error) {
    failure = error;
  }
  const stopped = controller.signal.aborted;
  controller = null;
  $("send").disabled = false;
  $("stop").disabled = true;
  if (failure && !stopped) {
    reply.parentElement.className = "msg error";
    reply.textContent = content + (content ? "\n" : "") + `error: ${failure.message}`;
    setStatus("error");
    return;
  }
  history.push({ role, content: text });
  if (toolCalls.length) {
    const calls = toolCalls.map(({ index, ...call }) => call);
    reply.textContent = calls.map((c) => `[tool call] ${c.function.name}(${c.function.arguments})`).join("\n");
    history.push({ role: "assistant", content: null, tool_calls: calls });
    awaitingToolResult = true;
    $("input").placeholder = "The model called a tool: type its result (JSON or text)";
  } else {
    history.push({ role: "assistant", content });
    awaitingToolResult = false;
    $("input").placeholder = "Type a message; Enter sends, Shift+Enter is a new line";
  }
  if (stopped) note(reply, "stopped");
  else if (finish === "length") note(reply, "cut at the token limit");
  setStatus(stopped ? "stopped" : "ready");
}

function stop() {
  if (controller) controller.abort();  // closing the stream makes the server free the row
}

function clear() {
  stop();
  history = [];
  awaitingToolResult = false;
  $("log").replaceChildren();
  setStatus("ready");
}

init();
