() => {
  // A file given to an upload box that Gradio's page refuses by its type (a video on the Speech tab's clip box or the
  // Voice tab's reference clip, a PDF on the Image tab's references) got Gradio's own "Invalid file type: talk.mp4.
  // Only audio/* allowed.", a MIME-type list. Such a file, dropped or chosen in a box with the class
  // studio-says-refused, is stopped before Gradio sees it, and its name and type are written into the box's hidden
  // twin (common.say_refused_files), which says in the tab's words what to do with it; the others go in as before.
  const takes = (accept, file) => !accept || accept.split(",").map((t) => t.trim().toLowerCase()).some((t) =>
    t === "*" || t === "file/*" || (t.startsWith(".") ? file.name.toLowerCase().endsWith(t)
      : t.endsWith("/*") ? file.type.startsWith(t.slice(0, -1)) : file.type === t));  // (Gradio's own test)
  const report = (box, file) => {
    const twin = document.querySelector(`#${box.id}-refused-file textarea, #${box.id}-refused-file input`);
    if (!twin) return false;
    twin.value = JSON.stringify({ name: file.name, type: file.type, at: Date.now() });  // (a change each time)
    twin.dispatchEvent(new Event("input", { bubbles: true }));
    return true;
  };
  let passing = false;  // the files a box takes, given on to Gradio (below), are not looked at again
  const passOn = (e, good) => {
    const files = new DataTransfer();
    good.forEach((f) => files.items.add(f));
    passing = true;
    try {
      if (e.type === "drop") {
        e.target.dispatchEvent(new DragEvent("drop", { bubbles: true, cancelable: true, dataTransfer: files }));
      } else {
        e.target.files = files.files;
        e.target.dispatchEvent(new Event("change", { bubbles: true }));
      }
    } finally {
      passing = false;
    }
  };
  const guard = (e, files) => {
    const box = !passing && e.target instanceof Element ? e.target.closest(".studio-says-refused") : null;
    const accept = box?.querySelector("input[type=file]")?.accept;
    const given = Array.from(files || []);
    const wrong = box && box.id ? given.filter((f) => !takes(accept, f)) : [];
    if (!wrong.length || !report(box, wrong[0])) return;
    e.preventDefault();
    e.stopPropagation();
    const good = given.filter((f) => !wrong.includes(f));
    if (good.length) {  // the pictures of a drop with a PDF among them still go in
      passOn(e, good);
    } else if (e.type === "drop") {  // Gradio's box stays in its "drop here" look until the drag leaves it
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
