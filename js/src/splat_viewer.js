// The browser side of fastavatar_nb.webviewer: Gaussian heads drawn with WebGL2 by gsplat.js
// (https://github.com/dylanebert/gsplat.js, MIT), one canvas per head, all panels sharing one camera.
//
// Conventions (the package's, see fastavatar_nb/cameras.py):
//   world: metres, +y up, the face looks along +z; cameras are OpenCV (x right, y down, z forward).
//   The orbit camera sits at target + distance * (cos(pitch) sin(yaw), sin(pitch), cos(pitch) cos(yaw))
//   and looks at target with world up +y: Cameras.from_spherical in Python, cameraPose() here.
//   Focal length f = 0.5 * height / tan(fov_y / 2) pixels, principal point at the centre.
// A head arrives as one little-endian byte buffer (fastavatar_nb.webviewer.pack_head):
//   [K*3 float32 means][K*3 float32 scales][K*4 float32 unit quaternions wxyz][K*4 uint8 RGBA]
//   RGBA is the SH band-0 colour (0.5 + SH_C0 * sh[0], clamped) and the opacity: the browser draws
//   spherical-harmonic degree 0 only (view-independent colour).
//
// The module serves two hosts with one code path:
//   * anywidget: `export default { render({ model, el }) }`, the model is the Jupyter widget's;
//   * a standalone page (Gaussians.to_html, the text/html of an exported notebook): mount(el, model)
//     with a small in-page model (staticModel) that holds the same fields.

import { Camera, Color32, Quaternion, Scene, Splat, SplatData, Vector3, WebGLRenderer } from "gsplat";

const BYTES_PER_GAUSSIAN = 44;
const DRAG_DEG_PER_PX = 0.4; // orbit speed: degrees of yaw/pitch per pixel dragged
const WHEEL_ZOOM = 0.0015; // distance factor per wheel delta unit (exp)
const PITCH_LIMIT_DEG = 85;
const SETTLE_MS = 600; // keep drawing this long after a change: the depth sort arrives from a worker
const PREVIEW_SCALE = 0.5; // while the mouse moves the view, panels draw at this fraction of their resolution
const WHEEL_SETTLE_MS = 250; // full resolution again this long after the last wheel event

export function unpackHead(view) {
  if (view.byteLength % BYTES_PER_GAUSSIAN !== 0) {
    throw new Error(`head buffer of ${view.byteLength} bytes is not a multiple of ${BYTES_PER_GAUSSIAN}`);
  }
  const K = view.byteLength / BYTES_PER_GAUSSIAN;
  // each array gets its own ArrayBuffer (copied, so aligned): gsplat.js transfers them to its workers one by one
  const part = (Type, offset, count) => new Type(view.buffer.slice(view.byteOffset + offset,
    view.byteOffset + offset + count * Type.BYTES_PER_ELEMENT));
  const positions = part(Float32Array, 0, 3 * K);
  const scales = part(Float32Array, 12 * K, 3 * K);
  const rotations = part(Float32Array, 24 * K, 4 * K);
  const colors = part(Uint8Array, 40 * K, 4 * K);
  return new SplatData(K, positions, rotations, scales, colors);
}

// Camera-to-world pose of the orbit camera: eye position and the rotation (columns: camera x, y, z).
export function cameraPose(yawDeg, pitchDeg, distance, target) {
  const yaw = (yawDeg * Math.PI) / 180;
  const pitch = (pitchDeg * Math.PI) / 180;
  const eye = [
    target[0] + distance * Math.cos(pitch) * Math.sin(yaw),
    target[1] + distance * Math.sin(pitch),
    target[2] + distance * Math.cos(pitch) * Math.cos(yaw),
  ];
  const norm = (v) => { const n = Math.hypot(v[0], v[1], v[2]); return [v[0] / n, v[1] / n, v[2] / n]; };
  const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
  const z = norm([target[0] - eye[0], target[1] - eye[1], target[2] - eye[2]]);
  const x = norm(cross([0, -1, 0], z)); // right = down x forward
  const y = cross(z, x); // down
  return { eye, x, y, z };
}

// Unit quaternion (x, y, z, w) of the rotation whose columns are x, y, z.
function quaternionFromColumns(x, y, z) {
  const m00 = x[0], m10 = x[1], m20 = x[2];
  const m01 = y[0], m11 = y[1], m21 = y[2];
  const m02 = z[0], m12 = z[1], m22 = z[2];
  const tr = m00 + m11 + m22;
  let qx, qy, qz, qw;
  if (tr > 0) {
    const s = 2 * Math.sqrt(tr + 1);
    qw = s / 4; qx = (m21 - m12) / s; qy = (m02 - m20) / s; qz = (m10 - m01) / s;
  } else if (m00 > m11 && m00 > m22) {
    const s = 2 * Math.sqrt(1 + m00 - m11 - m22);
    qw = (m21 - m12) / s; qx = s / 4; qy = (m01 + m10) / s; qz = (m02 + m20) / s;
  } else if (m11 > m22) {
    const s = 2 * Math.sqrt(1 + m11 - m00 - m22);
    qw = (m02 - m20) / s; qx = (m01 + m10) / s; qy = s / 4; qz = (m12 + m21) / s;
  } else {
    const s = 2 * Math.sqrt(1 + m22 - m00 - m11);
    qw = (m10 - m01) / s; qx = (m02 + m20) / s; qy = (m12 + m21) / s; qz = s / 4;
  }
  return [qx, qy, qz, qw];
}

export function webgl2Available() {
  try {
    const gl = document.createElement("canvas").getContext("webgl2");
    if (!gl) return { ok: false, renderer: "" };
    const info = gl.getExtension("WEBGL_debug_renderer_info");
    const renderer = info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
    gl.getExtension("WEBGL_lose_context")?.loseContext();
    return { ok: true, renderer: String(renderer) };
  } catch (err) {
    return { ok: false, renderer: String(err) };
  }
}

class Panel {
  constructor(parent, width, height, title, rgb) {
    this.root = document.createElement("div");
    this.root.className = "fa-splat-panel";
    this.root.style.cssText = "display:inline-block;margin:0 4px 0 0;vertical-align:top;text-align:center;";
    this.width = width;
    this.height = height;
    this.scale = 1;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "fa-splat-canvas";
    this.canvas.width = width;
    this.canvas.height = height;
    this.canvas.title = "drag to orbit, wheel to zoom (drawn by gsplat.js with WebGL2: spherical harmonics " +
      "of degree 0; while moving at half resolution)";
    this.canvas.style.cssText = `width:${width}px;height:${height}px;display:block;cursor:grab;touch-action:none;` +
      `background:rgb(${rgb.join(",")});`;
    this.label = document.createElement("div");
    this.label.className = "fa-splat-title";
    this.label.style.cssText = "font:12px sans-serif;color:#333;height:16px;";
    this.label.textContent = title || "";
    this.root.append(this.canvas, this.label);
    parent.appendChild(this.root);
    this.renderer = new WebGLRenderer(this.canvas, []); // [] : no fade-in pass (heads appear at once)
    this.renderer.backgroundColor = new Color32(rgb[0], rgb[1], rgb[2], 255); // the canvas's CSS background
    this.renderer.setSize(width, height);
    this.scene = new Scene();
    this.camera = new Camera();
    this.camera.data.near = 0.01;
    this.camera.data.far = 100;
    this.splat = null;
  }

  setHead(view) {
    if (this.splat) this.scene.removeObject(this.splat);
    this.splat = new Splat(unpackHead(view));
    this.scene.addObject(this.splat);
  }

  // Draw at `scale` times the panel's resolution (the page still shows it at full size).
  setScale(scale) {
    if (scale === this.scale) return;
    this.scale = scale;
    this.renderer.setSize(Math.max(8, Math.round(this.width * scale)), Math.max(8, Math.round(this.height * scale)));
    this.setFocal(this.focal);
  }

  // The focal length in drawing-buffer pixels, also in the shader's `focal` uniform (which gsplat.js sets
  // only when it initialises, and which sizes each splat on screen).
  setFocal(focal) {
    this.focal = focal;
    const f = focal * this.scale;
    this.camera.data.fx = f;
    this.camera.data.fy = f;
    const program = this.renderer.renderProgram;
    if (program.program && program.camera) {
      const gl = this.renderer.gl;
      gl.useProgram(program.program);
      gl.uniform2fv(gl.getUniformLocation(program.program, "focal"), new Float32Array([f, f]));
    }
  }

  setCamera(pose, focal) {
    if (focal !== this.focal) this.setFocal(focal);
    this.camera.position = new Vector3(pose.eye[0], pose.eye[1], pose.eye[2]);
    const q = quaternionFromColumns(pose.x, pose.y, pose.z);
    this.camera.rotation = new Quaternion(q[0], q[1], q[2], q[3]);
  }

  draw() {
    if (this.splat) this.renderer.render(this.scene, this.camera);
  }

  // true once the worker's depth order covers every Gaussian of the current head
  sorted() {
    const order = this.renderer.renderProgram.depthIndex;
    return !this.splat || (order !== undefined && order.length === this.splat.data.vertexCount);
  }

  dispose() {
    this.renderer.dispose();
  }
}

// Shows every head of `model` side by side, one camera for all; returns a cleanup function.
export function mount(el, model) {
  const host = document.createElement("div");
  host.className = "fa-splat-viewer";
  host.style.cssText = "display:inline-block;user-select:none;";
  el.appendChild(host);
  const gl = webgl2Available();
  if (!gl.ok) {
    host.textContent = "WebGL2 is not available in this browser: the kernel-rendered viewer is used instead.";
    model.set("renderer", "unavailable");
    model.save_changes();
    return () => host.remove();
  }
  const row = document.createElement("div");
  row.style.cssText = "white-space:nowrap;";
  const status = document.createElement("div");
  status.className = "fa-splat-status";
  status.style.cssText = "font:11px sans-serif;color:#666;";
  host.append(row, status);

  const width = model.get("width");
  const height = model.get("height");
  const bg = model.get("background");
  const background = bg.map((c) => Math.round(255 * c));
  let panels = [];
  let drawUntil = 0;
  let frames = 0;
  let frameWindowStart = performance.now();
  let fps = 0;
  let rafId = 0;

  const focal = () => (0.5 * height) / Math.tan((model.get("fov_y_deg") * Math.PI) / 360);
  const updateCamera = () => {
    const pose = cameraPose(model.get("yaw"), model.get("pitch"), model.get("distance"), model.get("target"));
    for (const p of panels) p.setCamera(pose, focal());
  };
  const describe = () => {
    const ks = (model.get("heads") || []).map((h) => h.byteLength / BYTES_PER_GAUSSIAN);
    status.textContent = `WebGL2 · SH degree 0 · K = ${ks.join(" / ")} · ` +
      `yaw ${model.get("yaw").toFixed(0)}°, pitch ${model.get("pitch").toFixed(0)}°, ` +
      `${model.get("distance").toFixed(2)} m` + (fps ? ` · ${fps.toFixed(0)} fps` : "") +
      " · drag to orbit, wheel to zoom";
  };
  const loop = (now) => {
    rafId = 0;
    for (const p of panels) p.draw();
    frames += 1;
    if (now - frameWindowStart > 1000) {
      fps = (1000 * frames) / (now - frameWindowStart);
      frames = 0;
      frameWindowStart = now;
      describe();
    }
    if (now < drawUntil || !panels.every((p) => p.sorted())) rafId = requestAnimationFrame(loop);
    else host.dataset.drawn = String(Number(host.dataset.drawn || 0) + 1); // settled: tests wait on this
  };
  const redraw = () => {
    drawUntil = performance.now() + SETTLE_MS;
    if (!rafId) rafId = requestAnimationFrame(loop);
  };
  const buildPanels = () => {
    const heads = model.get("heads") || [];
    const titles = model.get("titles") || [];
    if (heads.length !== panels.length) {
      for (const p of panels) { p.dispose(); p.root.remove(); }
      panels = heads.map((_, i) => new Panel(row, width, height, titles[i], background));
      attachPointer();
    }
    heads.forEach((h, i) => { panels[i].setHead(h); panels[i].label.textContent = titles[i] || ""; });
    updateCamera();
    describe();
    redraw();
  };

  // mouse: drag = orbit (yaw, pitch), wheel = distance; the camera goes back to the kernel on release
  let drag = null;
  const preview = (on) => {
    for (const p of panels) p.setScale(on ? PREVIEW_SCALE : 1);
    redraw();
  };
  let wheelTimer = 0;
  const onDown = (ev) => {
    drag = { x: ev.clientX, y: ev.clientY, yaw: model.get("yaw"), pitch: model.get("pitch") };
    preview(true);
    ev.target.setPointerCapture?.(ev.pointerId);
    ev.target.style.cursor = "grabbing";
  };
  const onMove = (ev) => {
    if (!drag) return;
    let yaw = drag.yaw - DRAG_DEG_PER_PX * (ev.clientX - drag.x);
    yaw = ((((yaw + 180) % 360) + 360) % 360) - 180;
    const pitch = Math.max(-PITCH_LIMIT_DEG, Math.min(PITCH_LIMIT_DEG, drag.pitch + DRAG_DEG_PER_PX * (ev.clientY - drag.y)));
    model.set("yaw", yaw);
    model.set("pitch", pitch);
    updateCamera();
    describe();
    redraw();
  };
  const onUp = (ev) => {
    if (!drag) return;
    drag = null;
    ev.target.style.cursor = "grab";
    preview(false);
    model.save_changes();
  };
  const onWheel = (ev) => {
    ev.preventDefault();
    model.set("distance", model.get("distance") * Math.exp(WHEEL_ZOOM * ev.deltaY));
    model.save_changes();
    preview(true);
    clearTimeout(wheelTimer);
    wheelTimer = setTimeout(() => preview(false), WHEEL_SETTLE_MS);
    updateCamera();
    describe();
    redraw();
  };
  function attachPointer() {
    for (const p of panels) {
      p.canvas.addEventListener("pointerdown", onDown);
      p.canvas.addEventListener("pointermove", onMove);
      p.canvas.addEventListener("pointerup", onUp);
      p.canvas.addEventListener("pointercancel", onUp);
      p.canvas.addEventListener("wheel", onWheel, { passive: false });
    }
  }

  const onCamera = () => { updateCamera(); describe(); redraw(); };
  model.on("change:heads", buildPanels);
  model.on("change:titles", buildPanels);
  for (const name of ["yaw", "pitch", "distance", "target"]) model.on(`change:${name}`, onCamera);
  model.set("renderer", gl.renderer);
  model.save_changes();
  buildPanels();

  // for tests and benchmarks: orbit for `ms` milliseconds, drawing every animation frame at `scale`
  // times the panels' resolution (PREVIEW_SCALE is what a mouse drag uses)
  host.fastavatarBenchmark = (ms = 2000, scale = 1) => new Promise((resolve) => {
    preview(false);
    for (const p of panels) p.setScale(scale);
    const start = performance.now();
    const yaw0 = model.get("yaw");
    let n = 0;
    const step = (now) => {
      model.set("yaw", yaw0 + 0.2 * n);
      updateCamera();
      for (const p of panels) p.draw();
      n += 1;
      if (now - start < ms) requestAnimationFrame(step);
      else {
        model.set("yaw", yaw0);
        preview(false);
        updateCamera();
        redraw();
        resolve({ frames: n, seconds: (now - start) / 1000, fps: (1000 * n) / (now - start), panels: panels.length, scale });
      }
    };
    requestAnimationFrame(step);
  });

  return () => {
    cancelAnimationFrame(rafId);
    model.off("change:heads", buildPanels);
    model.off("change:titles", buildPanels);
    for (const name of ["yaw", "pitch", "distance", "target"]) model.off(`change:${name}`, onCamera);
    for (const p of panels) p.dispose();
    host.remove();
  };
}

// A model for a page without a kernel: fields from JSON, heads from base64; set/save do nothing else.
export function staticModel(state) {
  const values = { ...state };
  values.heads = (state.heads_b64 || []).map((b64) => {
    const raw = atob(b64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return new DataView(bytes.buffer);
  });
  const listeners = {};
  return {
    get: (name) => values[name],
    set: (name, value) => {
      values[name] = value;
      for (const cb of listeners[`change:${name}`] || []) cb();
    },
    save_changes: () => {},
    on: (event, cb) => { (listeners[event] ||= []).push(cb); },
    off: (event, cb) => { listeners[event] = (listeners[event] || []).filter((f) => f !== cb); },
  };
}

export default {
  render({ model, el }) {
    return mount(el, model);
  },
};
