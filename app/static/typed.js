() => {
  // The Chat tab shows a user's message exactly as typed: Gradio renders every message as Markdown and HTML, so
  // "<b>x</b>" showed a bold x, a code snippet with tags showed only its text and "*word*" was in italics. The
  // message's own aria-label carries its text as sent ("user's message: " + text); a text of the user's is shown
  // from it, as plain text, in place of Gradio's rendering (the model's replies stay Markdown). Copy, edit and what
  // the engine gets were always the text as typed.
  const prefix = "user's message: ";
  const showTyped = () => {
    for (const message of document.querySelectorAll("#chat-history [data-testid=user][aria-label]")) {
      const label = message.getAttribute("aria-label");
      const content = message.querySelector(":scope > .message-content");
      const rendered = content?.querySelector(":scope > .md");
      if (!label.startsWith(prefix) || !rendered) continue;  // an attachment, or the message being edited
      let typed = content.querySelector(":scope > .studio-typed");
      if (!typed) {
        typed = document.createElement("div");
        typed.className = "studio-typed";
        typed.style.cssText = "white-space: pre-wrap; overflow-wrap: anywhere;";
        rendered.after(typed);
      }
      const text = label.slice(prefix.length);
      if (typed.textContent !== text) typed.textContent = text;
      rendered.style.display = "none";
    }
  };
  let queued = false;
  new MutationObserver(() => {
    if (!queued) {
      queued = true;
      requestAnimationFrame(() => { queued = false; showTyped(); });
    }
  }).observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ["aria-label"] });
  showTyped();
}
