() => {
  // The Chat tab's conversations, kept in this browser across reloads: one per browser tab. The page's tab has an
  // id of its own in sessionStorage (a reload keeps it, another tab has another), and localStorage holds the list of
  // recent conversations by id, each written alone: one conversation for the whole browser (gr.BrowserState) made
  // two tabs overwrite each other's, and the last written came back in both at the next reload. A conversation of
  // a tab closed since is offered under "Earlier conversations" (earlier) and reopened there (open).
  const store = "ming-studio-chats", tab = "ming-studio-chat-id", most = 20;
  const read = () => {
    try {
      const chats = JSON.parse(localStorage.getItem(store) || "[]");
      return Array.isArray(chats) ? chats.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages)) : [];
    } catch { return []; }
  };
  const write = (chats) => {
    for (let kept = chats.slice(0, most); ; kept = kept.slice(0, -1)) {
      try { localStorage.setItem(store, JSON.stringify(kept)); return; } catch { /* full: the oldest go */ }
      if (!kept.length) return;
    }
  };
  const tabId = () => {
    let id = sessionStorage.getItem(tab);
    if (!id) {  // (crypto.randomUUID needs https: a studio reached over plain http from another machine has none)
      id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
      sessionStorage.setItem(tab, id);
    }
    return id;
  };
  const firstText = (messages) => {
    for (const m of messages) {
      for (const part of Array.isArray(m?.content) ? m.content : [m?.content]) {
        const text = typeof part === "string" ? part : part?.type === "text" ? part.text : "";
        if (m.role === "user" && text && text.trim()) return text.trim().replace(/\s+/g, " ").slice(0, 60);
      }
    }
    return "(attachments only)";
  };
  return {
    keep(history) {  // this tab's conversation as it is now (emptied: gone from the list)
      const id = tabId(), others = read().filter((c) => c.id !== id);
      write(history && history.length ? [{ id, at: Date.now(), messages: history }, ...others] : others);
    },
    mine() { return read().find((c) => c.id === tabId())?.messages ?? null; },
    earlier() {
      const id = tabId();
      return read().filter((c) => c.id !== id)
        .map((c) => ({ id: c.id, label: `${new Date(c.at).toLocaleString()}: ${firstText(c.messages)}` }));
    },
    open(id) {  // this tab takes up the conversation `id` (its own stays in the list)
      if (read().some((c) => c.id === id)) sessionStorage.setItem(tab, id);
      return this.mine();
    },
  };
}
