(local = localStorage, session = sessionStorage, page = globalThis,
 timing = { refreshMs: 10000, expiresMs: 25000 }) => {
  // The Chat tab's conversations, kept in this browser across reloads: one per browser tab. The page's tab has an
  // id of its own in sessionStorage (a reload keeps it, another tab has another), and localStorage holds each recent
  // conversation under a key of its own (prefix + id), which only its tab writes: one list of them all, read, changed
  // and written back whole by each tab, lost a tab's write when another saved at the same instant (each wrote the
  // list as it had read it). A conversation of a tab closed since is offered under "Earlier conversations" (earlier)
  // and reopened there (open). `local` / `session`: the two stores (the browser's; a test gives its own).
  // A conversation open in a tab is claimed by that page (a claim in localStorage, refreshed while the page lives,
  // released when it goes, expiring when it died without a word): it is listed as open in another tab and cannot be
  // opened a second time (two tabs wrote the same conversation, the later write won and the other tab's turns were
  // lost). `page`: this page's global object, where its claim's holder lives across calls (one per page, not per tab
  // id: a duplicated tab copies sessionStorage, hence the id, and takes a fresh one, see hold()). `timing`: how often a
  // claim is refreshed and how long after its last refresh it expires (ms).
  const prefix = "ming-studio-chats/", tab = "ming-studio-chat-id", most = 20;
  // Where the conversations were kept as one list before (carried over once, then removed). The conversation of the
  // version before that, a gr.BrowserState under legacyKey, cannot be carried over: Gradio encrypted it with a secret
  // drawn when that studio started, gone with it (that version itself lost it at each restart): legacy() says so once.
  const listKey = "ming-studio-chats", legacyKey = "ming-studio-chat";
  const claimPrefix = "ming-studio-chat-open/";
  // A hidden page's own timers may run only once a minute (Chrome's throttling of background tabs), so a hidden page's
  // claim lasted 90 s, and a page that died hidden (a phone's tab killed in the background: no pagehide) held its
  // conversation "open in another tab" that long. The claim is refreshed by a dedicated worker's timer, which browsers
  // do not throttle so, and expires as soon, shown or hidden. A page about to be frozen (its worker with it: a phone's
  // background tab, before it is killed) releases its claim and takes it again if it resumes; one whose claim lapsed
  // meanwhile and was taken by another tab writes a conversation of its own from then on (ownId).
  const claimRefreshMs = timing.refreshMs, claimExpiresMs = timing.expiresMs;
  const me = (page.mingChatClaim ??= { holder: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}` });
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
  const alive = (claim) => Boolean(claim) && Date.now() - (claim.at || 0) < claimExpiresMs;
  const heldElsewhere = (id) => {  // whether another page that is alive has the conversation `id` open
    const claim = parsed(local.getItem(claimPrefix + id));
    return Boolean(claim && claim.holder !== me.holder && alive(claim));
  };
  const claim = (id) => {
    const held = { holder: me.holder, at: Date.now() };
    try { local.setItem(claimPrefix + id, JSON.stringify(held)); } catch { /* full */ }
  };
  const dropDeadClaims = () => {  // the claims of pages that died without releasing them, once expired
    const keys = Array.from({ length: local.length }, (_, i) => local.key(i)).filter((k) => k?.startsWith(claimPrefix));
    for (const key of keys) {
      if (!alive(parsed(local.getItem(key)))) local.removeItem(key);
    }
  };
  const release = (id) => {
    if (parsed(local.getItem(claimPrefix + id))?.holder === me.holder) local.removeItem(claimPrefix + id);
  };
  const everyRefresh = (refresh) => {  // refresh() every claimRefreshMs, by a worker's timer where the page has one
    const byPage = () => page.setInterval(refresh, claimRefreshMs);
    try {
      const tick = `setInterval(() => postMessage(0), ${claimRefreshMs});`;
      const worker = new page.Worker(URL.createObjectURL(new Blob([tick], { type: "text/javascript" })));
      worker.onmessage = refresh;
      worker.onerror = () => { worker.terminate(); me.timer = byPage(); };  // (refused by the page's policy)
      return worker;
    } catch {
      return byPage();
    }
  };
  const write = (chat) => {  // this tab's conversation; the oldest others go past `most`, or while the store is full
    const others = read().filter((c) => c.id !== chat.id);
    drop(others.slice(most - 1));
    for (let kept = others.slice(0, most - 1); !put(chat) && kept.length; kept = kept.slice(0, -1)) {
      drop(kept.slice(-1));
    }
  };
  const ownId = () => {  // this tab's id, a fresh one when another live page holds it (this one is a duplicate of it)
    if (heldElsewhere(tabId())) session.removeItem(tab);
    return tabId();
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
      const id = ownId();
      if (history && history.length) write({ id, at: Date.now(), messages: history });
      else { carryOver(); local.removeItem(prefix + id); }
    },
    mine() { return read().find((c) => c.id === tabId())?.messages ?? null; },
    earlier() {  // the others, each `held` when it is open in another tab (which the label says)
      const id = tabId();
      return read().filter((c) => c.id !== id).map((c) => {
        const held = heldElsewhere(c.id);
        const label = `${new Date(c.at).toLocaleString()}: ${firstText(c.messages)}`;
        return { id: c.id, held, label: held ? `${label} (open in another tab)` : label };
      });
    },
    hold() {  // at page load: this page claims its tab's conversation while it lives (see claimRefreshMs)
      dropDeadClaims();
      claim(ownId());
      if (me.timer) return;
      const refresh = () => { if (!me.gone && !heldElsewhere(tabId())) claim(tabId()); };
      me.timer = everyRefresh(refresh);
      // refreshed at once when shown (not once the page has gone: its visibilitychange follows pagehide)
      page.document?.addEventListener("visibilitychange", refresh);
      const leave = () => { me.gone = true; release(tabId()); };
      const back = () => { me.gone = false; claim(ownId()); };
      page.addEventListener("pagehide", leave);
      page.addEventListener("pageshow", (e) => { if (e.persisted) back(); });  // (back from the bfcache)
      page.document?.addEventListener("freeze", leave);
      page.document?.addEventListener("resume", back);
    },
    heldElsewhere,
    legacy() {  // whether the unreadable conversation of before per-tab chats was here (true once: it is dropped)
      if (local.getItem(legacyKey) === null) return false;
      local.removeItem(legacyKey);
      return true;
    },
    open(id) {  // this tab takes up the conversation `id` (its own stays in the list), unless another tab has it open
      if (!heldElsewhere(id) && read().some((c) => c.id === id)) {
        release(tabId());
        session.setItem(tab, id);
        claim(id);
      }
      return this.mine();
    },
  };
}
