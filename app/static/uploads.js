() => {
  // A file given to an audio box (the Speech tab's clip, the Voice tab's reference clip) whose type is not audio/*
  // (a video, a PDF) was refused by Gradio's page with its own "Invalid file type: talk.mp4. Only audio/* allowed.".
  // Such a file, dropped or chosen in a box with the class studio-audio-only, is stopped before Gradio sees it, and
  // its name and type are written into the box's hidden twin (common.say_refused_files), which says in the tab's
  // words what to do with it.
  const refused = (files) => Array.from(files || []).filter((f) => !f.type.startsWith("audio/"));
  const report = (box, file) => {
    const twin = document.querySelector(`#${box.id}-refused-file textarea, #${box.id}-refused-file input`);
    if (!twin) return false;
    twin.value = JSON.stringify({ name: file.name, type: file.type, at: Date.now() });  // (a change each time)
    twin.dispatchEvent(new Event("input", { bubbles: true }));
    return true;
  };
  const guard = (e, files) => {
    const box = e.target instanceof Element ? e.target.closest(".studio-audio-only") : null;
    const wrong = box && box.id ? refused(files) : [];
    if (!wrong.length || !report(box, wrong[0])) return;
    e.preventDefault();
    e.stopPropagation();
    if (e.type === "drop") {  // Gradio's box stays in its "drop here" look until the drag leaves it
      e.target.dispatchEvent(new DragEvent("dragleave", { bubbles: true }));
    } else {
      e.target.value = "";  // the same file chosen again is reported again
    }
  };
  document.addEventListener("drop", (e) => guard(e, e.dataTransfer?.files), true);
  document.addEventListener("change", (e) => {
    if (e.target instanceof HTMLInputElement && e.target.type === "file") guard(e, e.target.files);
  }, true);
}
