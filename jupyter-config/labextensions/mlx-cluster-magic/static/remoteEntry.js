// A prebuilt JupyterLab / Notebook 7 extension, written by hand (it needs no shared package, so
// no bundler): the container that JupyterLab's federated extensions expose (init, get) around
// one plugin.
//
// The sidecar package's view (the live status view's side panel) connects to
// `app.shell._rightHandler.sideBar.tabCloseRequested` before it adds its panel with
// `app.shell.add(panel, "right")`. JupyterLab's shell has that tab bar; Notebook 7's right-hand
// area has none (a panel there is collapsed, not closed), so sidecar's view fails before it adds
// anything. This plugin gives Notebook 7's right-hand area a signal of that name that nothing
// emits, and sidecar then opens its panel there. Where the area was collapsed, the live view
// asks (an "mlx-cluster-magic:show-panel" event on the document, naming the panel's id) and the
// plugin shows that panel again, if it is one in the right-hand area. JupyterLab is left as it
// is (its side bar has a tab for each panel).
(function () {
  const NO_TAB_CLOSE = { connect: () => true, disconnect: () => true };
  const plugin = {
    id: "mlx-cluster-magic:notebook7-side-panel",
    description: "Lets sidecar's panel open in Notebook 7's right-hand area",
    autoStart: true,
    activate: (app) => {
      const right = app.shell && app.shell._rightHandler;
      if (!right || right.sideBar !== undefined) return; // JupyterLab, or a shell that has one
      right.sideBar = { tabCloseRequested: NO_TAB_CLOSE };
      document.addEventListener("mlx-cluster-magic:show-panel", (event) => {
        const id = event.detail && event.detail.id;
        if (typeof id === "string" && app.shell.getWidgetArea?.(id) === "right") {
          app.shell.activateById(id);
        }
      });
    },
  };
  const modules = { "./extension": { __esModule: true, default: plugin } };
  const container = {
    init: () => undefined,
    get: (name) =>
      name in modules
        ? Promise.resolve(() => modules[name])
        : Promise.reject(new Error(`mlx-cluster-magic has no module ${name}`)),
  };
  (window._JUPYTERLAB = window._JUPYTERLAB || {})["mlx-cluster-magic"] = container;
})();
