// Swagger UI for /openapi.json, from assets served by atrium itself (no CDN).
// A file of its own, not an inline script: the page's CSP allows scripts from 'self' only.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis],
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // the public validator is another origin: never called
});
