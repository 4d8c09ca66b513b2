() => {
  // Names the text fields Gradio leaves unnamed, for screen readers (and gives texts their own direction, below): a
  // MultimodalTextbox's text area (its label is only a hidden span of the block) and a Textbox with a copy button
  // (the <label> around it names its first labelable element: the button). Such a field gets its block's label as
  // aria-label. Tabs are built when first opened, so new fields are looked for whenever the page changes (once per
  // frame).
  const unnamed = ".block textarea:not([aria-label]), .block input[type=text]:not([aria-label])";
  const nameFields = () => {
    for (const field of document.querySelectorAll(unnamed)) {
      const labelled = Array.from(field.labels || []).some((l) => l.textContent.trim());
      const title = field.closest(".block")?.querySelector("[data-testid=block-info]")?.textContent.trim();
      if (!labelled && title && !field.getAttribute("aria-labelledby")) field.setAttribute("aria-label", title);
    }
    // Right-to-left text (Arabic, Hebrew) in a message or a text box read left to right, its punctuation on the wrong
    // side: each takes the direction of its own text.
    for (const text of document.querySelectorAll(".message-content:not([dir=auto]), .block textarea:not([dir=auto])")) {
      text.setAttribute("dir", "auto");
    }
    // A picture shown by an Image output (the Image tab's Result, Mask and Overlay) is a button around an image with
    // no alt text: a screen reader said only "button". It takes its block's label.
    for (const shown of document.querySelectorAll(".block button:not([aria-label]):has(> .image-frame)")) {
      const label = shown.closest(".block")?.querySelector("[data-testid=block-label]")?.textContent.trim();
      if (label && !shown.textContent.trim()) shown.setAttribute("aria-label", label);
    }
    for (const run of document.querySelectorAll("button.studio-run:not([aria-keyshortcuts])")) {
      run.setAttribute("aria-keyshortcuts", "Control+Enter Meta+Enter");  // (the Ctrl+Enter below)
    }
  };
  let queued = false;
  new MutationObserver(() => {
    if (!queued) {
      queued = true;
      requestAnimationFrame(() => { queued = false; nameFields(); });
    }
  }).observe(document.body, { childList: true, subtree: true });
  nameFields();
  // Ctrl+Enter (Cmd+Enter on a Mac) in a text box of a tab made with common.runs_tab presses that tab's button made
  // with common.run_button (Make it, Transcribe): Chat sends on Enter, the other tabs had no key to run them. The
  // button says so to screen readers (aria-keyshortcuts).
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey) || e.isComposing) return;
    const box = e.target instanceof Element ? e.target.closest(".studio-runs-tab") : null;
    const run = box ? (box.closest("[role=tabpanel]") || document).querySelector("button.studio-run") : null;
    if (!run || run.disabled || !run.offsetParent) return;
    e.preventDefault();
    run.click();
  });
  // Escape (or the Close button) in a gallery's preview closed it and left the focus on the page's top: a keyboard user
  // started again from the first control. The focus goes back to the grid's thumbnail of the picture shown (the one
  // that opened the preview, unless the arrows moved on), which the preview's strip names "Thumbnail N of M" as the
  // grid does.
  const closingPreview = (e) => {
    const preview = e.target instanceof Element ? e.target.closest(".preview") : null;
    const block = preview && preview.closest(".block");
    if (!block || !block.querySelector("button.thumbnail-lg, button.thumbnail-small")) return;
    if (e.type === "keydown" ? e.key !== "Escape" : !e.target.closest("button[aria-label=Close]")) return;
    const shown = preview.querySelector("button.thumbnail-small.selected")?.getAttribute("aria-label");
    const back = () => {
      const thumbs = Array.from(block.querySelectorAll("button.thumbnail-lg"));
      const thumb = thumbs.find((b) => b.getAttribute("aria-label") === shown) || thumbs[0];
      if (!thumb) return false;
      thumb.focus();
      return true;
    };
    let frames = 0;  // the grid is drawn again once the preview is gone (a frame or a few later)
    const retry = () => { if (!back() && ++frames < 30) requestAnimationFrame(retry); };
    requestAnimationFrame(retry);
  };
  document.addEventListener("keydown", closingPreview, true);
  document.addEventListener("click", closingPreview, true);
}
