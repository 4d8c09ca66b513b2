() => {
  // Names the text fields Gradio leaves unnamed, for screen readers: a MultimodalTextbox's text area (its
  // label is only a hidden span of the block) and a Textbox with a copy button (the <label> around it names
  // its first labelable element: the button). Such a field gets its block's label as aria-label. Tabs are
  // built when first opened, so new fields are looked for whenever the page changes (once per frame).
  const unnamed = ".block textarea:not([aria-label]), .block input[type=text]:not([aria-label])";
  const nameFields = () => {
    for (const field of document.querySelectorAll(unnamed)) {
      const labelled = Array.from(field.labels || []).some((l) => l.textContent.trim());
      const title = field.closest(".block")?.querySelector("[data-testid=block-info]")?.textContent.trim();
      if (!labelled && title && !field.getAttribute("aria-labelledby")) field.setAttribute("aria-label", title);
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
}
