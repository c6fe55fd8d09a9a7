// Lets the ipywidgets HTML manager run offline beside MathJax 3 in the rendered book.
// Loaded after require.js and before embed-amd.js (see nb_ipywidgets_js in _config.yml).
(function () {
  // 1. RequireJS resolves the widget manager's modules (and so its font files) against baseUrl: point it at the
  //    copy of the npm packages served from _static/vendor/npm/ instead of the page's own folder.
  var src = document.currentScript.src.split("?")[0];
  var base = src.slice(0, src.lastIndexOf("/") + 1);
  require.config({ baseUrl: base + "vendor/npm/" });
  // 2. The widget controls typeset labels with MathJax 2's MathJax.Hub.Queue; MathJax 3 has typesetPromise.
  //    This listener is registered before the manager's own, so the bridge exists when widgets render.
  document.addEventListener("DOMContentLoaded", function () {
    if (window.MathJax && !window.MathJax.Hub) {
      window.MathJax.Hub = {
        Queue: function (command) {
          if (window.MathJax.typesetPromise && command && command[2]) {
            window.MathJax.typesetPromise([command[2]]).catch(function () {});
          }
        },
      };
    }
  });
})();
