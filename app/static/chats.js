(local = localStorage, session = sessionStorage) => {
  // The Chat tab's conversations, kept in this browser across reloads: one per browser tab. The page's tab has an
  // id of its own in sessionStorage (a reload keeps it, another tab has another), and localStorage holds each recent
  // conversation under a key of its own (prefix + id), which only its tab writes: one list of them all, read, changed
  // and written back whole by each tab, lost a tab's write when another saved at the same instant (each wrote the
  // list as it had read it). A conversation of a tab closed since is offered under "Earlier conversations" (earlier)
  // and reopened there (open). `local` / `session`: the two stores (the browser's; a test gives its own).
  const prefix = "ming-studio-chats/", tab = "ming-studio-chat-id", most = 20;
  // Where the conversations were kept as one list before (carried over once, then removed). The conversation of the
  // version before that, a gr.BrowserState under legacyKey, cannot be carried over: Gradio encrypted it with a secret
  // drawn when that studio started, gone with it (that version itself lost it at each restart): legacy() says so once.
  const listKey = "ming-studio-chats", legacyKey = "ming-studio-chat";
  const valid = (c) => c && typeof c.id === "string" && Array.isArray(c.messages);
  const parsed = (text) => { try { return JSON.parse(text); } catch { return null; } };
  const put = (chat) => {
    try { local.setItem(prefix + chat.id, JSON.stringify(chat)); return true; } catch { return false; }  // (full)
  };
  const carryOver = () => {  // the one list of before, once: each of its conversations under its own key
    const raw = local.getItem(listKey);
    if (raw === null) return;
    const list = parsed(raw);
    for (const c of Array.isArray(list) ? list.filter(valid) : []) {
      if (local.getItem(prefix + c.id) === null) put(c);  // (a tab that saved since keeps its own newer copy)
    }
    local.removeItem(listKey);
  };
  const read = () => {  // every kept conversation, the most recent first
    carryOver();
    const chats = [];
    for (let i = 0; i < local.length; i++) {
      const key = local.key(i);
      const c = key && key.startsWith(prefix) ? parsed(local.getItem(key)) : null;
      if (valid(c) && prefix + c.id === key) chats.push(c);
    }
    return chats.sort((a, b) => (b.at || 0) - (a.at || 0));
  };
  const drop = (chats) => chats.forEach((c) => local.removeItem(prefix + c.id));
  const write = (chat) => {  // this tab's conversation; the oldest others go past `most`, or while the store is full
    const others = read().filter((c) => c.id !== chat.id);
    drop(others.slice(most - 1));
    for (let kept = others.slice(0, most - 1); !put(chat) && kept.length; kept = kept.slice(0, -1)) {
      drop(kept.slice(-1));
    }
  };
  const tabId = () => {
    let id = session.getItem(tab);
    if (!id) {  // (crypto.randomUUID needs https: a studio reached over plain http from another machine has none)
      id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
      session.setItem(tab, id);
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
      const id = tabId();
      if (history && history.length) write({ id, at: Date.now(), messages: history });
      else { carryOver(); local.removeItem(prefix + id); }
    },
    mine() { return read().find((c) => c.id === tabId())?.messages ?? null; },
    earlier() {
      const id = tabId();
      return read().filter((c) => c.id !== id)
        .map((c) => ({ id: c.id, label: `${new Date(c.at).toLocaleString()}: ${firstText(c.messages)}` }));
    },
    legacy() {  // whether the unreadable conversation of before per-tab chats was here (true once: it is dropped)
      if (local.getItem(legacyKey) === null) return false;
      local.removeItem(legacyKey);
      return true;
    },
    open(id) {  // this tab takes up the conversation `id` (its own stays in the list)
      if (read().some((c) => c.id === id)) session.setItem(tab, id);
      return this.mine();
    },
  };
}
