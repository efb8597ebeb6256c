// MathJax 3 set-up. MathJax itself is served by the site (javascripts/mathjax/tex-chtml.js,
// copied by docs/hooks.py from the npm package pinned in docs/package-lock.json): formulas
// render with no network.
//
// Formulas are looked for in two kinds of element only:
//   - arithmatex: pymdownx.arithmatex (generic mode) wraps the Markdown pages' math in
//     <span class="arithmatex">\( \)</span> and <div class="arithmatex">\[ \]</div>;
//   - jp-RenderedMarkdown: a tutorial's Markdown cell, whose math keeps the notebook's $ and $$.
// MathJax skips an element whose class matches ignoreHtmlClass unless it matches
// processHtmlClass, and an element without a class inherits the decision of its parent. So
// ignoreHtmlClass must not match an empty class: ".+" skips every element that has a class
// (navigation, code, ...), and the <p>, <li> and <h2> of a notebook cell, which have none, are
// searched like the cell itself.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".+",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown",
  },
  // The page is typeset below, once per page. A second pass over a page already typeset would
  // find no new formula, and clearCache() before it would drop the CSS of the glyphs drawn by
  // the first: the formulas would keep their place and show nothing.
  startup: { typeset: false },
};

// mkdocs-material announces each page on document$ (once per load, and again after an
// instant-navigation swap): typeset it once MathJax has started.
document$.subscribe(() => {
  if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) {
    return;  // tex-chtml.js did not load: the TeX stays readable as it is
  }
  MathJax.startup.promise = MathJax.startup.promise.then(() => {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    return MathJax.typesetPromise();
  });
});
